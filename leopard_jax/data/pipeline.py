"""grain input pipeline: records → identity-grouped order → augment → normalise → batches.

With `augment.where="device"` the workers only read records and draw each image's
parameters (`augment.draw`); the batch carries uint8 images with `matrix` [B, 2, 3] and
`jitter` [B, 3], and the jitted step warps, jitters and normalises (`device_augment`).

One training epoch is a fixed table of record indices (`sampling`), so its length is
known up front, every process of a multi-host run agrees on it, and each process loads
only its own columns (whole device shards). Each element's randomness comes from
(seed, epoch, position in the epoch table), never from worker state, so the stream is
the same for any worker count and resumes exactly from a saved iterator state.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from grain._src.python.ipc import shared_memory_array  # grain's segment deleter

from leopard_jax.data import augment as augment_lib
from leopard_jax.data import records, sampling

Row = Mapping[str, str]


def class_names(rows: Sequence[Row], *, keep_singletons: bool = True) -> list[str]:
    """Sorted identities that get a label; the label of a row is its index here.

    With keep_singletons=False, identities with one image get none (CosFace has no class
    centre for them); rows with an empty identity never get one.
    """
    counts: dict[str, int] = {}
    for row in rows:
        if row["identity"]:
            counts[row["identity"]] = counts.get(row["identity"], 0) + 1
    return sorted(name for name, n in counts.items() if keep_singletons or n > 1)


def label_array(rows: Sequence[Row], classes: Sequence[str]) -> np.ndarray:
    """int32 [N]: index of each row's identity in `classes`, -1 when it has none."""
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index.get(row["identity"], -1) for row in rows], dtype=np.int32)


class _Example:
    """Position in the epoch table -> one example dict. Picklable, for grain workers."""

    def __init__(
        self,
        source: records.RecordSource,
        table: np.ndarray,
        positions: np.ndarray,
        epochs: np.ndarray,
        labels: np.ndarray,
        config: augment_lib.AugmentConfig,
        seed: int,
        normalize: bool = True,
        on_device: bool = False,
    ):
        self.source, self.table, self.positions, self.epochs = source, table, positions, epochs
        self.labels, self.config, self.seed, self.normalize = labels, config, seed, normalize
        self.on_device = on_device

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        index = int(self.table[i])
        if index < 0:
            dtype = np.float32 if self.normalize else np.uint8
            example = {
                "image": np.zeros(self.source.shape, dtype),
                "label": np.int32(-1),
                "mask": np.bool_(False),
            }
            if self.on_device:  # identity warp, factors of 1
                example["matrix"] = np.eye(2, 3, dtype=np.float32)
                example["jitter"] = np.ones(3, np.float32)
            return example
        rng = np.random.default_rng([self.seed, int(self.epochs[i]), int(self.positions[i])])
        example = {"label": np.int32(self.labels[index]), "mask": np.bool_(True)}
        if self.on_device:
            matrix, factors = augment_lib.draw(rng, *self.source.shape[:2], self.config)
            example["matrix"] = matrix.astype(np.float32)
            example["jitter"] = factors.astype(np.float32)
            return {"image": self.source[index], **example}
        image = augment_lib.augment(self.source[index], rng, self.config)
        if self.normalize:
            image = augment_lib.normalize(image)
        return {"image": image, **example}


def _batched(
    example: _Example, batch: int, worker_count: int, read_threads: int
) -> grain.IterDataset:
    dataset = grain.MapDataset.range(len(example.table)).map(example).batch(batch)
    dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads or 1)
    )
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its absl flags when it starts workers
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=2)
        ).map(_out_of_shared_memory)
    return dataset


def _out_of_shared_memory(batch: Any) -> Any:
    """The batch in this process's own memory, its worker's shared-memory segments unlinked
    now, on the reading thread. Two reasons: on the CPU backend `device_put` aliases host
    memory, and JAX lets go of it late, from its own threads; and grain's iterators hold
    batches in reference cycles, freed only by a collection. Either way a segment could outlive
    `release_shared_memory` and be reported leaked at exit. One host copy per batch."""
    return jax.tree.map(_own_copy, batch)


def _own_copy(leaf: Any) -> Any:
    copy = np.array(leaf)
    if isinstance(leaf, shared_memory_array.SharedMemoryArray) and leaf._unlink_on_del:
        leaf.shm.unlink()  # the name goes now; the mapping stays until grain closes it
        leaf._unlink_on_del = False  # grain's deleter must not unlink it a second time
    return copy


@dataclasses.dataclass(frozen=True)
class Epoch:
    """`steps` batches (of `num_epochs` epochs, less the `start_step` skipped in the first).
    `iter(epoch)` is always the same grain iterator, whose get_state()/set_state() save and
    restore the position (a small dict); `close()` stops its worker processes, also
    mid-stream (then `release_shared_memory()` unlinks the batches grain had buffered)."""

    iterator: grain.DatasetIterator
    steps: int
    num_epochs: int = 1
    start_step: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return (self.steps + self.start_step) // self.num_epochs

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> grain.DatasetIterator:
        return self.iterator

    def close(self) -> None:
        self.iterator.close()


def release_shared_memory() -> None:
    """Unlink now the worker shared memory of batches the caller has dropped (call after
    `Epoch.close()` and dropping every batch). grain unlinks each segment from a background
    thread, and its iterators sit in reference cycles: a process that exits right after a
    stop would leave segments behind (Python reports them as leaked). From here on a dropped
    batch unlinks its segments at once, on the thread that drops it (also during the
    interpreter's last collection, when grain's thread no longer runs); the next stream
    that starts workers turns grain's background deleter on again."""
    pool = shared_memory_array.SharedMemoryArray._del_thread_pool
    shared_memory_array.SharedMemoryArray._disable_async_del()
    gc.collect()  # the cycles' batches: unlinked during the collection
    if pool is not None:
        pool.close()
        pool.join()  # returns once the unlinks queued before are done


def train_table(
    rows: Sequence[Row],
    *,
    global_batch: int,
    seed: int,
    epoch: int,
    num_devices: int,
    keep_singletons: bool = False,
    images_per_identity: int = 4,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """The epoch's [steps, global_batch] table of row indices (-1 pads), same on every process.

    Groups are formed from `labels` (default: `label_array(rows, class_names(rows, ...))`).
    """
    if labels is None:
        labels = label_array(rows, class_names(rows, keep_singletons=keep_singletons))
    groups = sampling.epoch_groups(
        labels,
        seed=seed,
        epoch=epoch,
        images_per_identity=images_per_identity,
        keep_singletons=keep_singletons,
    )
    if not groups:
        raise ValueError(
            "no training images: every identity was dropped (unlabelled or a single image); "
            "check the split or set keep_singletons"
        )
    return sampling.epoch_batches(groups, global_batch=global_batch, num_shards=num_devices)


def train_loader(
    source_rows: Sequence[Row],
    dataset_dir: str | os.PathLike,
    *,
    global_batch: int,
    seed: int,
    epoch: int,
    num_devices: int,
    process_index: int = 0,
    process_count: int = 1,
    augment_config: augment_lib.AugmentConfig | Mapping[str, Any] | None = None,
    worker_count: int = 0,
    read_threads: int = 2,
    keep_singletons: bool = False,
    images_per_identity: int = 4,
    labels: np.ndarray | None = None,
    normalize: bool = True,
    num_epochs: int = 1,
    start_step: int = 0,
) -> Epoch:
    """This process's batches for epochs [epoch, epoch + num_epochs), from batch
    `start_step` of the first: [global_batch / process_count, H, W, 4] each. Several epochs
    in one stream keep worker processes (and their prefetch) alive across epoch boundaries;
    every epoch has the same step count. A stream started at (epoch, start_step) is exactly
    the tail of one started at (epoch, 0): that is how a run resumes.

    `num_devices` is the global device count; device shards are contiguous, so
    `parallel.shard(batch)` keeps each identity group on one device. Labels
    index `class_names(source_rows, keep_singletons=keep_singletons)` unless `labels`
    (int [N], -1 = no class) gives the caller's own mapping. `normalize=False` yields uint8
    images (4× fewer bytes between worker processes and to the device) for the caller to
    normalise on the accelerator with `augment.MEAN`/`augment.STD`. Augmentation runs where
    `augment_config.where` says (resolved for `jax.default_backend()`); on the device the
    images stay uint8 and unaugmented, so `normalize` must be False.
    """
    config = augment_lib.AugmentConfig.of(augment_config)
    on_device = config.place(jax.default_backend()) == "device"
    if on_device and normalize:
        raise ValueError("augment where='device' needs normalize=False (the step normalises)")
    rows = list(source_rows)
    if labels is None:
        labels = label_array(rows, class_names(rows, keep_singletons=keep_singletons))
    labels = np.asarray(labels, dtype=np.int32)
    if labels.shape != (len(rows),):
        raise ValueError(f"labels has shape {labels.shape}; expected one per row ({len(rows)},)")
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    columns = sampling.process_columns(global_batch, num_devices, process_index, process_count)
    tables = [
        train_table(
            rows,
            global_batch=global_batch,
            seed=seed,
            epoch=e,
            num_devices=num_devices,
            keep_singletons=keep_singletons,
            images_per_identity=images_per_identity,
            labels=labels,
        )
        for e in range(epoch, epoch + num_epochs)
    ]
    steps, width = tables[0].shape[0], columns.stop - columns.start
    assert all(len(t) == steps for t in tables), (
        "packing gives every epoch the same number of batches"
    )
    if start_step >= steps:
        raise ValueError(f"start_step {start_step} is past the epoch's {steps} steps")
    positions = np.arange(tables[0].size).reshape(tables[0].shape)[:, columns].ravel()
    skip = slice(start_step * width, None)
    example = _Example(
        records.RecordSource(dataset_dir, rows),
        np.concatenate([t[:, columns].ravel() for t in tables])[skip],
        np.tile(positions, num_epochs)[skip],
        np.repeat(np.arange(epoch, epoch + num_epochs), steps * width)[skip],
        labels,
        config,
        int(seed),
        normalize,
        on_device,
    )
    dataset = _batched(example, width, worker_count, read_threads)
    return Epoch(iter(dataset), steps * num_epochs - start_step, num_epochs, start_step)
