"""Training, split as flax's imagenet example and big_vision split theirs.

__main__.py     flags only: `python -m leopard_jax.train --config C --workdir W`
loop.py         train_and_evaluate: reads top to bottom, calls the helpers below
state.py        model, optimiser, learning-rate schedule, TrainState, imported weights
steps.py        per-device train step and batch-norm sync (pmapped over parallel.AXIS)
evaluation.py   held-out retrieval metrics through the one embed path
checkpoints.py  orbax checkpoints: state, progress and the data iterator's position
rows.py         which labelled rows train and which are held out
report.py       metrics.jsonl and TensorBoard
"""


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""
