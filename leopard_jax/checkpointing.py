"""Orbax checkpoints of a training run: `latest` (resume) and `best` (by held-out DT5AP).

Each checkpoint holds two items: `state` (the unreplicated TrainState pytree) and
`progress` (JSON: epoch, step within the epoch, the data iterator's state, best score,
non-finite step counts). Together they are everything a rerun needs to continue the same
stream and end exactly where an uninterrupted run ends. Saves are synchronous: a save that
returned is on disk, so a kill right after loses nothing.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

LATEST = "latest"
BEST = "best"


class RunCheckpoints:
    """The two checkpoint series of one workdir."""

    def __init__(self, workdir: str | pathlib.Path):
        root = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
        self._managers = {
            name: ocp.CheckpointManager(root / name, options=options, item_names=("state", "progress"))
            for name in (LATEST, BEST)
        }

    def save(self, which: str, step: int, state: Any, progress: dict[str, Any]) -> None:
        manager = self._managers[which]
        host_state = jax.tree.map(np.asarray, state)
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(host_state), progress=ocp.args.JsonSave(progress)),
            force=True,
        )
        manager.wait_until_finished()

    def latest_step(self, which: str = LATEST) -> int | None:
        return self._managers[which].latest_step()

    def restore(self, which: str, template_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state shaped like `template_state`, progress) of the newest checkpoint."""
        manager = self._managers[which]
        step = manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, jax.tree.map(np.asarray, template_state))
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore())
        )
        return restored["state"], dict(restored["progress"])

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()
