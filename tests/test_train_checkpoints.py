"""Run checkpoints: state, progress and the data iterator's position survive a restart."""

from __future__ import annotations

import grain
import jax
import numpy as np

from leopard_jax.train import checkpoints
from leopard_jax.train.state import TrainState


def _state(step: int) -> TrainState:
    w = np.arange(6, dtype=np.float32).reshape(2, 3) * step
    return TrainState(
        step=np.int32(step),
        params={"model": {"w": w}},
        batch_stats={"mean": w[0]},
        opt_state={"mu": w + 1},
        rng=np.array([0, step], np.uint32),
    )


def _iterator() -> grain.DatasetIterator:
    return iter(grain.MapDataset.range(20).batch(4).to_iter_dataset())


def test_mid_epoch_checkpoint_resumes_the_data_stream_where_it_stopped(tmp_path):
    ckpts = checkpoints.RunCheckpoints(tmp_path)
    assert ckpts.latest_step() is None
    data = _iterator()
    seen = [next(data) for _ in range(2)]
    progress = checkpoints.Progress(epoch=1, step_in_epoch=2, best_dt5ap=0.25, skipped_steps=1)
    ckpts.save(checkpoints.LATEST, _state(7), progress, data=data)
    rest = list(data)
    ckpts.close()

    ckpts = checkpoints.RunCheckpoints(tmp_path)  # a new process, as a rerun is
    assert ckpts.latest_step() == 7
    state, restored = ckpts.restore(checkpoints.LATEST, _state(0))
    assert restored == progress
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_state(7)), strict=True):
        np.testing.assert_array_equal(got, want)
    fresh = _iterator()
    ckpts.restore_data(checkpoints.LATEST, fresh)
    resumed = list(fresh)
    ckpts.close()
    assert len(seen) + len(resumed) == 5
    for a, b in zip(rest, resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_end_of_epoch_checkpoint_replaces_the_mid_epoch_one(tmp_path):
    ckpts = checkpoints.RunCheckpoints(tmp_path)
    data = _iterator()
    next(data)
    ckpts.save(checkpoints.LATEST, _state(1), checkpoints.Progress(step_in_epoch=1), data=data)
    ckpts.save(checkpoints.LATEST, _state(5), checkpoints.Progress(epoch=1))
    ckpts.save(checkpoints.BEST, _state(5), checkpoints.Progress(epoch=1, best_dt5ap=0.5))
    assert ckpts.latest_step() == 5 and ckpts.latest_step(checkpoints.BEST) == 5
    _, progress = ckpts.restore(checkpoints.LATEST, _state(0))
    assert progress == checkpoints.Progress(epoch=1)
    ckpts.close()
    step_dirs = list((tmp_path / "checkpoints" / "latest").iterdir())
    assert [p.name for p in step_dirs if p.name.isdigit()] == ["5"]
    assert not (tmp_path / "checkpoints" / "latest" / "5" / "data").exists()
