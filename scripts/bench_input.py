"""Does the input path keep up with the accelerator? Loader-only rate and the real training
loop with the model step swapped for a stand-in of fixed duration.

    python scripts/bench.py input [--step-ms 206]

`input_part(...)` returns the rows `scripts/bench.py` puts beside train/embed:
  loader_img_s          images/s out of `pipeline.train_loader` alone (uint8, augmentation
                        where `where` says; "device" leaves the warp and jitter to the step)
  device_augment_img_s  images/s of the jitted device augmentation + normalisation alone
                        (on this backend), what "device" adds to each step
  end_to_end_fraction   the real `train.loop.train_and_evaluate` over `--epochs` epochs with
                        `steps.train_step` replaced by a stand-in that waits `--step-ms` per
                        step on the device side (a host callback): stand-in rate / achieved
                        rate, from the first step's start to the last step's end, epoch
                        boundaries (batch-norm sync, checkpoint, report) included
  epoch_stall_ms        the longest extra wait between the last step of an epoch and the
                        first of the next, beyond the stand-in's own duration
The held-out evaluation is stubbed as well (it runs the model; what it costs is not the
input path's). Inputs are made here: random-pattern records, 4 per individual.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_dataset(root: pathlib.Path, num_images: int, height: int, width: int) -> None:
    """`num_images` random-pattern records of individuals with 4 images each; 1 in 5
    individuals held out (split.json)."""
    from leopard_jax.data import records

    root.mkdir(parents=True, exist_ok=True)
    records.save_settings(root, dict(height=height, width=width, channels=4))
    rng = np.random.default_rng(0)
    identities = max(2, num_images // 4)

    def items():
        for ident in range(identities):
            pattern = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
            for k in range(4):
                noise = rng.integers(0, 16, pattern.shape, dtype=np.uint8)
                row = {"key": f"id{ident}/{k}", "source": f"id{ident}/{k}.jpg"}
                yield {**row, "identity": f"id{ident}"}, pattern + noise

    records.write_records(root, "part-00000", items())
    names = [f"id{i}" for i in range(identities)]
    records.save_split(root, {"train": names[identities // 5 :], "test": names[: identities // 5]})


def _mark_flags_parsed() -> None:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
        flags.FLAGS(sys.argv[:1])


def loader_rate(
    data_dir: pathlib.Path, batch: int, workers: int, where: str, batches: int = 30
) -> float:
    """Images/s out of train_loader after its workers are up (first batches not timed)."""
    from leopard_jax.data import pipeline, records

    _mark_flags_parsed()
    rows = [r for r in records.read_manifest(data_dir) if r["split"] != "test"]
    per_epoch = len(pipeline.train_table(rows, global_batch=batch, seed=0, epoch=0, num_devices=1))
    warmup = 2 + 2 * workers
    data = pipeline.train_loader(
        rows,
        data_dir,
        global_batch=batch,
        seed=0,
        epoch=0,
        num_epochs=-(-(warmup + batches) // per_epoch),
        num_devices=1,
        worker_count=workers,
        augment_config={"where": where},
        normalize=False,
    )
    try:
        iterator = iter(data)
        for _ in range(warmup):
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches * batch / (time.perf_counter() - start)
    finally:
        data.close()


def device_augment_rate(batch: int, height: int, width: int, repeats: int = 5) -> float:
    """Images/s of the step's input part (`steps.input_images` with drawn parameters)."""
    import jax

    from leopard_jax.data import augment
    from leopard_jax.train import steps

    rng = np.random.default_rng(0)
    draws = [augment.draw(rng, height, width, augment.AugmentConfig()) for _ in range(batch)]
    inputs = {
        "image": rng.integers(0, 256, (batch, height, width, 4), dtype=np.uint8),
        "matrix": np.stack([m for m, _ in draws]).astype(np.float32),
        "jitter": np.stack([f for _, f in draws]).astype(np.float32),
    }
    fn = jax.jit(steps.input_images)
    inputs = jax.device_put(inputs)
    fn(inputs).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(inputs).block_until_ready()
    return repeats * batch / (time.perf_counter() - start)


def _stand_in_step(state, batch, epoch, *, step_s: float, stamps: list, **unused):
    """The step's signature and outputs, its time a host-side wait of `step_s` that starts
    when the batch is on the device (it depends on the images)."""
    import jax
    import jax.numpy as jnp

    def wait(x):
        start = time.perf_counter()
        time.sleep(step_s)
        stamps.append((start, time.perf_counter()))
        return np.float32(0.0) * x

    touched = batch["image"].reshape(-1)[0].astype(jnp.float32)
    zero = jax.pure_callback(wait, jax.ShapeDtypeStruct((), jnp.float32), touched)
    images = jnp.sum(batch["mask"])
    logs = {"loss": zero, "finite": zero + 1.0, "batch_dt5ap": zero, "images": images}
    return state.replace(step=state.step + 1), logs


def _evaluation_stub(*args, **kwargs) -> dict[str, float]:
    return {"test_DT5AP": 0.0}


def end_to_end(
    data_dir: pathlib.Path,
    workdir: pathlib.Path,
    *,
    step_ms: float,
    epochs: int,
    batch: int,
    workers: int,
    where: str,
    backbone: str = "resnet18",
) -> dict[str, float]:
    """The real loop with the stand-in step: (fraction of the stand-in's rate, worst
    epoch-boundary stall in ms, steps per epoch)."""
    from configs import default
    from leopard_jax.train import evaluation, loop, steps

    _mark_flags_parsed()
    config = default.get_config()
    config.data_dir = str(data_dir)
    config.num_epochs = epochs
    config.batch_size = batch
    config.workers = workers
    config.augment.where = where
    config.model.backbone = backbone  # only initialised and checkpointed: the step is stubbed
    config.model.dims = 16
    config.eval.every_epochs = epochs
    stamps: list[tuple[float, float]] = []
    originals = steps.train_step, evaluation.evaluate
    steps.train_step = functools.partial(_stand_in_step, step_s=step_ms / 1000, stamps=stamps)
    evaluation.evaluate = _evaluation_stub
    try:
        loop.train_and_evaluate(config, workdir)
    finally:
        steps.train_step, evaluation.evaluate = originals
    per_epoch = len(stamps) // epochs
    starts = np.array([s for s, _ in stamps])
    ends = np.array([e for _, e in stamps])
    wall = ends[-1] - starts[0]
    boundaries = [(starts[e * per_epoch] - ends[e * per_epoch - 1]) * 1e3 for e in range(1, epochs)]
    return {
        "end_to_end_fraction": len(stamps) * step_ms / 1e3 / wall,
        "epoch_stall_ms": max(boundaries),
        "step_gap_ms_median": float(np.median(starts[1:] - ends[:-1]) * 1e3),
        "steps_per_epoch": per_epoch,
    }


def input_part(
    *,
    step_ms: float = 206.0,
    epochs: int = 3,
    batch: int = 64,
    size: tuple[int, int] = (256, 512),
    images: int = 1024,
    workers: int | None = None,
    where: str = "device",
) -> dict[str, Any]:
    """The input rows for the bench JSON (see the module docstring)."""
    import jax

    if workers is None:
        workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        data_dir = pathlib.Path(tmp) / "dataset"
        make_dataset(data_dir, images, *size)
        row: dict[str, Any] = {
            "part": "input",
            "backend": jax.default_backend(),
            "batch": batch,
            "size": list(size),
            "workers": workers,
            "where": where,
            "step_ms": step_ms,
            "epochs": epochs,
            "loader_img_s": loader_rate(data_dir, batch, workers, where),
            "device_augment_img_s": device_augment_rate(batch, *size),
        }
        row.update(
            end_to_end(
                data_dir,
                pathlib.Path(tmp) / "work",
                step_ms=step_ms,
                epochs=epochs,
                batch=batch,
                workers=workers,
                where=where,
            )
        )
    return row
