"""Identity-grouped epoch order (the paper's sampler) and its packing into device batches.

The paper draws an individual with weight log(n_remaining + 1), takes up to 4 of its
unused images, and repeats until every image of the epoch is used once. Groups of the
same individual are what give CosFace/triplet losses positives inside a batch, so the
packing keeps each group inside one device's shard of the batch whenever sizes allow.
Everything here is plain numpy and deterministic for (seed, epoch): every process of a
multi-host run computes the same table and takes its own columns.
"""

from __future__ import annotations

import collections

import numpy as np


def epoch_groups(
    labels: np.ndarray,
    *,
    seed: int,
    epoch: int,
    images_per_identity: int = 4,
    keep_singletons: bool = False,
) -> list[np.ndarray]:
    """The epoch's groups: arrays of indices into `labels`, each from one identity.

    Labels < 0 (unknown identity) are never drawn. Identities with one image are dropped
    unless `keep_singletons` (CosFace drops them; triplet losses keep them as negatives).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if images_per_identity < 1:
        raise ValueError(f"images_per_identity must be >= 1, got {images_per_identity}")
    rng = np.random.default_rng([int(seed), int(epoch)])
    valid = np.flatnonzero(labels >= 0)
    order = valid[np.argsort(labels[valid], kind="stable")]
    ids, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    pools = [rng.permutation(order[s : s + c]) for s, c in zip(starts, counts)]
    if not keep_singletons:
        pools = [p for p in pools if len(p) > 1]
    remaining = np.array([len(p) for p in pools], dtype=np.int64)
    taken = np.zeros(len(pools), dtype=np.int64)
    groups = []
    while remaining.sum() > 0:
        weights = np.cumsum(np.log1p(remaining))
        k = int(np.searchsorted(weights, rng.random() * weights[-1], side="right"))
        k = min(k, len(pools) - 1)
        n = int(min(images_per_identity, remaining[k]))
        groups.append(pools[k][taken[k] : taken[k] + n])
        taken[k] += n
        remaining[k] -= n
    return groups


def epoch_batches(groups: list[np.ndarray], *, global_batch: int, num_shards: int) -> np.ndarray:
    """Pack groups in order into batches of `num_shards` device shards; -1 pads.

    Returns int64 [num_batches, global_batch]; columns [d*s, (d+1)*s) are device d's shard
    (s = global_batch // num_shards). Each shard takes the earliest group that still fits;
    a group is split only when no remaining group fits the space left (or it is larger than
    a whole shard), so padding appears only in the last batch.
    """
    if global_batch < 1 or num_shards < 1 or global_batch % num_shards:
        raise ValueError(
            f"global_batch ({global_batch}) must be a positive multiple of num_shards "
            f"({num_shards})"
        )
    per_shard = global_batch // num_shards
    by_size: dict[int, collections.deque] = collections.defaultdict(collections.deque)
    for position, group in enumerate(groups):
        if len(group):
            by_size[len(group)].append((position, np.asarray(group, dtype=np.int64)))

    def earliest(max_size: int | None):
        heads = [
            (q[0][0], size)
            for size, q in by_size.items()
            if q and (max_size is None or size <= max_size)
        ]
        return min(heads)[1] if heads else None

    shards: list[np.ndarray] = []
    current: list[np.ndarray] = []
    space = per_shard
    while True:
        first = earliest(None)
        if first is None:
            break
        size = first if (space == per_shard and first > per_shard) else earliest(space)
        if size is not None and size <= space:
            _, group = by_size[size].popleft()
            current.append(group)
            space -= size
        else:  # nothing fits (or an oversized group): split the earliest group
            size = first
            position, group = by_size[size].popleft()
            current.append(group[:space])
            by_size[len(group) - space].appendleft((position, group[space:]))
            space = 0
        if space == 0:
            shards.append(np.concatenate(current))
            current, space = [], per_shard
    if current:
        shards.append(np.concatenate(current))
    num_batches = -(-len(shards) // num_shards)
    table = np.full((num_batches * num_shards, per_shard), -1, dtype=np.int64)
    for i, shard in enumerate(shards):
        table[i, : len(shard)] = shard
    return table.reshape(num_batches, global_batch)


def process_columns(
    global_batch: int, num_shards: int, process_index: int, process_count: int
) -> slice:
    """The columns of a global batch that one process loads: whole, contiguous device shards."""
    if num_shards % process_count or not 0 <= process_index < process_count:
        raise ValueError(
            f"num_shards ({num_shards}) must be a multiple of process_count ({process_count}) "
            f"and 0 <= process_index ({process_index}) < process_count"
        )
    width = global_batch // process_count
    return slice(process_index * width, (process_index + 1) * width)
