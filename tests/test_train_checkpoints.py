"""Run checkpoints: state and progress survive a restart; the newest replaces the older."""

from __future__ import annotations

import jax
import numpy as np
import pytest

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


def test_mid_epoch_checkpoint_restores_state_and_where_the_stream_stopped(tmp_path):
    ckpts = checkpoints.RunCheckpoints(tmp_path)
    assert ckpts.latest_step() is None
    progress = checkpoints.Progress(epoch=1, step_in_epoch=2, best_dt5ap=0.25, skipped_steps=1)
    ckpts.save(checkpoints.LATEST, _state(7), progress)
    ckpts.close()

    ckpts = checkpoints.RunCheckpoints(tmp_path)  # a new process, as a rerun is
    assert ckpts.latest_step() == 7
    state, restored = ckpts.restore(checkpoints.LATEST, _state(0))
    ckpts.close()
    assert restored == progress
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_state(7)), strict=True):
        np.testing.assert_array_equal(got, want)


def test_end_of_epoch_checkpoint_replaces_the_mid_epoch_one(tmp_path):
    ckpts = checkpoints.RunCheckpoints(tmp_path)
    ckpts.save(checkpoints.LATEST, _state(1), checkpoints.Progress(step_in_epoch=1))
    ckpts.save(checkpoints.LATEST, _state(5), checkpoints.Progress(epoch=1))
    ckpts.save(checkpoints.BEST, _state(5), checkpoints.Progress(epoch=1, best_dt5ap=0.5))
    assert ckpts.latest_step() == 5 and ckpts.latest_step(checkpoints.BEST) == 5
    _, progress = ckpts.restore(checkpoints.LATEST, _state(0))
    assert progress == checkpoints.Progress(epoch=1)
    ckpts.close()
    step_dirs = list((tmp_path / "checkpoints" / "latest").iterdir())
    assert [p.name for p in step_dirs if p.name.isdigit()] == ["5"]


def test_saves_are_written_in_order_behind_the_caller_and_a_failed_write_is_raised(tmp_path):
    """`save` queues; `after_saves` runs once the saves before it are on disk; `wait`
    raises a write's error instead of losing it."""
    ckpts = checkpoints.RunCheckpoints(tmp_path)
    ckpts.save(checkpoints.LATEST, _state(3), checkpoints.Progress(epoch=2))
    seen = []
    ckpts.after_saves(
        lambda: seen.append(sorted(p.name for p in (tmp_path / "checkpoints" / "latest").iterdir()))
    )
    ckpts.wait()
    assert seen == [["3"]]

    def fail():
        raise OSError("disk full")

    ckpts.after_saves(fail)
    with pytest.raises(OSError, match="disk full"):
        ckpts.wait()
    ckpts.close()
    restored, progress = checkpoints.RunCheckpoints(tmp_path).restore(checkpoints.LATEST, _state(0))
    assert progress == checkpoints.Progress(epoch=2)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(_state(3)), strict=True):
        np.testing.assert_array_equal(got, want)
