"""Orbax checkpoints of a training run: `latest` (resume) and `best` (by held-out DT5AP).

Each checkpoint holds `state` (the unreplicated TrainState pytree) and `progress` (JSON:
epoch, step within the epoch, best score, skipped steps): everything a rerun needs to
continue the same stream (the loader restarts at that epoch and step) and end exactly where
an uninterrupted run ends. The input stream's position is (epoch, step), not grain's
iterator state: the device prefetch reads batches ahead of the steps taken, so the
iterator's own position would skip them; every batch is a function of (seed, epoch,
position), so restarting the loader there gives the same batches. Saves are synchronous: a
save that returned is on disk, so a kill right after loses nothing.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

LATEST = "latest"
BEST = "best"


@dataclasses.dataclass
class Progress:
    """Where a run is. `step_in_epoch` > 0 means the checkpoint was saved mid-epoch; the
    loop's input stream restarts at that batch of that epoch (`pipeline.train_loader`'s
    `start_step`), the same batches whatever was prefetched when it stopped."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0
    best_dt5ap: float = -1.0
    skipped_steps: int = 0  # non-finite steps, over the whole run


class RunCheckpoints:
    """The two checkpoint series of one workdir."""

    def __init__(self, workdir: str | pathlib.Path):
        root = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False
        )
        self._managers = {
            name: ocp.CheckpointManager(root / name, options=options, item_handlers=_handlers())
            for name in (LATEST, BEST)
        }

    def save(self, which: str, state: Any, progress: Progress) -> None:
        """Save host `state` and `progress` as the checkpoint of step `state.step`."""
        host_state = jax.tree.map(np.asarray, state)
        items = {
            "state": ocp.args.StandardSave(host_state),
            "progress": ocp.args.JsonSave(dataclasses.asdict(progress)),
        }
        manager = self._managers[which]
        manager.save(int(host_state.step), args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()

    def latest_step(self, which: str = LATEST) -> int | None:
        return self._managers[which].latest_step()

    def restore(self, which: str, template_state: Any) -> tuple[Any, Progress]:
        """(state shaped like `template_state`, progress) of the newest checkpoint."""
        manager = self._managers[which]
        abstract = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, jax.tree.map(np.asarray, template_state)
        )
        restored = manager.restore(
            manager.latest_step(),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()
            ),
        )
        saved = restored["progress"]  # unknown keys (older runs) are ignored
        fields = [f.name for f in dataclasses.fields(Progress) if f.name in saved]
        return restored["state"], Progress(**{name: saved[name] for name in fields})

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()


def _handlers() -> dict[str, Any]:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "progress": ocp.JsonCheckpointHandler(),
    }
