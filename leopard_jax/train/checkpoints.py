"""Orbax checkpoints of a training run: `latest` (resume) and `best` (by held-out DT5AP).

Each checkpoint holds `state` (the unreplicated TrainState pytree) and `progress` (JSON:
epoch, step within the epoch, best score, skipped steps): everything a rerun needs to
continue the same stream (the loader restarts at that epoch and step) and end exactly where
an uninterrupted run ends. The input stream's position is (epoch, step), not grain's
iterator state: the device prefetch reads batches ahead of the steps taken, so the
iterator's own position would skip them; every batch is a function of (seed, epoch,
position), so restarting the loader there gives the same batches.

Saves are written in the background, on one writer thread, in the order they were asked
for: `save` queues the host state and returns, so an epoch boundary costs the device-to-host
copy, not the write. `after_saves(fn, ...)` queues other writes that must follow a save
(the exported best model). `wait` (and `close`) block until everything queued is on disk
and raise a failed write's error. Orbax finalises a checkpoint by renaming its temporary
directory, so a process killed mid-write leaves the previous checkpoint intact; the loop's
SIGTERM/SIGINT path waits before it reports the save.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import pathlib
from collections.abc import Callable
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
        # Synchronous inside orbax: the writer thread is what makes saves asynchronous.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False
        )
        self._managers = {
            name: ocp.CheckpointManager(root / name, options=options, item_handlers=_handlers())
            for name in (LATEST, BEST)
        }
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt")
        self._queued: list[concurrent.futures.Future] = []

    def save(self, which: str, state: Any, progress: Progress) -> None:
        """Queue host `state` and a copy of `progress` as the checkpoint of step
        `state.step`. The state's arrays must stay as they are until the write is done (the
        loop's are its own host copies, from `parallel.unreplicate`)."""
        host_state = jax.tree.map(np.asarray, state)
        items = {
            "state": ocp.args.StandardSave(host_state),
            "progress": ocp.args.JsonSave(dataclasses.asdict(progress)),
        }
        manager = self._managers[which]
        self.after_saves(
            manager.save, int(host_state.step), args=ocp.args.Composite(**items), force=True
        )

    def after_saves(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run `fn(*args, **kwargs)` on the writer thread once the writes queued before it
        are done. A write that failed since the last call raises here."""
        for future in [f for f in self._queued if f.done()]:
            self._queued.remove(future)
            future.result()
        self._queued.append(self._writer.submit(fn, *args, **kwargs))

    def wait(self) -> None:
        """Block until every queued write is on disk; raise the first failed write's error."""
        queued, self._queued = self._queued, []
        for future in queued:
            future.result()

    def latest_step(self, which: str = LATEST) -> int | None:
        """The newest saved step of `which` (after the queued writes), or None."""
        self.wait()
        return self._managers[which].latest_step()

    def restore(self, which: str, template_state: Any) -> tuple[Any, Progress]:
        """(state shaped like `template_state`, progress) of the newest checkpoint."""
        self.wait()
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
        """Wait for the queued writes, then release the writer and the managers."""
        try:
            self.wait()
        finally:
            self._writer.shutdown()
            for manager in self._managers.values():
                manager.close()


def _handlers() -> dict[str, Any]:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "progress": ocp.JsonCheckpointHandler(),
    }
