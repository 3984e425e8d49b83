"""Identity-grouped epoch order and its packing into device shards."""

import collections

import numpy as np
import pytest

from leopard_jax.data import sampling


def _labels(seed=0, identities=30):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 12, identities)
    labels = np.repeat(np.arange(identities), counts)
    return rng.permutation(labels)  # rows of an identity are scattered, as in a manifest


def test_every_image_once_and_groups_are_single_identity():
    labels = _labels()
    groups = sampling.epoch_groups(labels, seed=3, epoch=0, keep_singletons=True)
    flat = np.concatenate(groups)
    assert sorted(flat) == list(range(len(labels)))
    for group in groups:
        assert 1 <= len(group) <= 4
        assert len(set(labels[group])) == 1


def test_group_sizes_take_four_until_the_identity_runs_out():
    labels = _labels(1)
    groups = sampling.epoch_groups(labels, seed=0, epoch=0, keep_singletons=True)
    sizes = collections.defaultdict(list)
    for group in groups:
        sizes[labels[group[0]]].append(len(group))
    for identity, got in sizes.items():
        n = int((labels == identity).sum())
        assert got == [4] * (n // 4) + ([n % 4] if n % 4 else [])


def test_singletons_and_unknown_dropped_unless_kept():
    labels = np.array([0, 0, 1, 2, 2, 2, -1, 3])  # 1 and 3 are singletons, -1 unknown
    dropped = np.concatenate(sampling.epoch_groups(labels, seed=0, epoch=0))
    assert sorted(dropped) == [0, 1, 3, 4, 5]
    kept = np.concatenate(sampling.epoch_groups(labels, seed=0, epoch=0, keep_singletons=True))
    assert sorted(kept) == [0, 1, 2, 3, 4, 5, 7]


def test_same_seed_and_epoch_same_order_next_epoch_differs():
    labels = _labels()
    a = sampling.epoch_groups(labels, seed=5, epoch=2)
    b = sampling.epoch_groups(labels, seed=5, epoch=2)
    c = sampling.epoch_groups(labels, seed=5, epoch=3)
    d = sampling.epoch_groups(labels, seed=6, epoch=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    assert not np.array_equal(np.concatenate(a), np.concatenate(d))


def test_draw_weight_is_log_of_remaining_plus_one():
    """First draw of an epoch: P(identity) = log(n+1) / Σ log(n_j+1), checked by frequency."""
    labels = np.repeat([0, 1, 2], [2, 8, 30])
    first = np.array(
        [labels[sampling.epoch_groups(labels, seed=0, epoch=e)[0][0]] for e in range(3000)]
    )
    expected = np.log1p([2, 8, 30]) / np.log1p([2, 8, 30]).sum()
    observed = np.bincount(first, minlength=3) / len(first)
    np.testing.assert_allclose(observed, expected, atol=0.03)


def _shards(table, num_shards):
    return table.reshape(len(table) * num_shards, -1)


@pytest.mark.parametrize("global_batch,num_shards", [(16, 1), (16, 2), (32, 4), (24, 3)])
def test_batches_use_every_image_once_and_pad_only_the_end(global_batch, num_shards):
    labels = _labels(2)
    groups = sampling.epoch_groups(labels, seed=0, epoch=0, keep_singletons=True)
    table = sampling.epoch_batches(groups, global_batch=global_batch, num_shards=num_shards)
    assert table.shape[1] == global_batch
    flat = table.ravel()
    assert sorted(flat[flat >= 0]) == list(range(len(labels)))
    assert (table[:-1] >= 0).all(), "padding before the last batch"
    assert len(table) == -(-len(labels) // global_batch)


def test_device_shards_hold_whole_groups_when_sizes_allow():
    """Groups of 4 and 2 always fit shards of 8: no group may be split."""
    labels = np.repeat(
        np.arange(40), np.where(np.arange(40) % 3 == 0, 6, 8)
    )  # 4+2 or 4+4 per identity
    groups = sampling.epoch_groups(labels, seed=1, epoch=0)
    table = sampling.epoch_batches(groups, global_batch=32, num_shards=4)
    shard_of = {int(i): s for s, shard in enumerate(_shards(table, 4)) for i in shard if i >= 0}
    for group in groups:
        assert len({shard_of[int(i)] for i in group}) == 1


def test_a_group_is_split_only_when_nothing_else_fits():
    """Replay the packing: whenever a group spans two shards, every group not yet placed
    was larger than the space its first shard had left."""
    labels = _labels(4, identities=60)
    groups = sampling.epoch_groups(labels, seed=0, epoch=0, keep_singletons=True)
    table = sampling.epoch_batches(groups, global_batch=20, num_shards=2)
    shards = _shards(table, 2)
    shard_of = {int(i): s for s, shard in enumerate(shards) for i in shard if i >= 0}
    group_of = {int(i): g for g, group in enumerate(groups) for i in group}
    split = [g for g, group in enumerate(groups) if len({shard_of[int(i)] for i in group}) > 1]
    assert 0 < len(split) < len(shards) // 4, "expected a few unavoidable splits"
    for g in split:
        first_shard = min(shard_of[int(i)] for i in groups[g])
        space = sum(1 for i in groups[g] if shard_of[int(i)] == first_shard)
        placed = {group_of[int(i)] for shard in shards[: first_shard + 1] for i in shard if i >= 0}
        waiting = [len(groups[h]) for h in range(len(groups)) if h not in placed]
        assert all(size > space for size in waiting)


def test_groups_larger_than_a_shard_are_split_in_order():
    groups = [np.arange(4 * k, 4 * k + 4) for k in range(3)]
    table = sampling.epoch_batches(groups, global_batch=4, num_shards=2)
    np.testing.assert_array_equal(table, np.arange(12).reshape(3, 4))


def test_process_columns_cover_whole_device_shards():
    cols = [sampling.process_columns(32, 4, p, 2) for p in range(2)]
    assert cols == [slice(0, 16), slice(16, 32)]
    with pytest.raises(ValueError, match="multiple of process_count"):
        sampling.process_columns(32, 3, 0, 2)
    with pytest.raises(ValueError, match="multiple of num_shards"):
        sampling.epoch_batches([np.arange(4)], global_batch=30, num_shards=4)
