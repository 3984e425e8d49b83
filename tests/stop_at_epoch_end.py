"""`python -m leopard_jax.train ARGS` with a SIGTERM that lands exactly at the end of the
first epoch: after that epoch's `latest` checkpoint is queued, before the loop looks for a
signal. A real signal hits that moment only by chance (test_train.py's SIGTERM test races
it); here it is hit every time.

    python tests/stop_at_epoch_end.py --config C --workdir W [--config.key=value ...]
"""

from __future__ import annotations

import signal

from absl import app

from leopard_jax.train import __main__ as train_cli
from leopard_jax.train import checkpoints

_save = checkpoints.RunCheckpoints.save
_sent = []


def save_then_signal(self, which, state, progress):
    _save(self, which, state, progress)
    # the first `latest` of a run that was not stopped is the end of its first epoch
    if which == checkpoints.LATEST and not _sent:
        _sent.append(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # the handler runs before the next bytecode


if __name__ == "__main__":
    checkpoints.RunCheckpoints.save = save_then_signal
    app.run(train_cli.main)
