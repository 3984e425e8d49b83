"""The one place that wires pmap: replicate a pytree over the local devices, shard a host
batch over them, and take one copy back.

Everything that runs a pmapped function (the training loop, the embed path, the bench,
the multi-device tests) goes through these three, so the layout of replicated arrays and
the shape of per-device batches are decided once.
"""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import jax_utils

AXIS = "batch"  # the pmapped axis name every collective reduces over


def replicate(tree: Any, devices=None) -> Any:
    """One copy of `tree` per device, laid out exactly as pmap lays out its outputs.

    `flax.jax_utils.replicate` gives the copies a different sharding from the one a pmapped
    step returns, so the step compiled on its first call would compile again on its second
    (~20 s for the demo model on CPU). A pass through an identity pmap over the same axis
    gives the first call the layout every later call sees."""
    key = None if devices is None else tuple(devices)
    return _identity_pmap(key)(jax_utils.replicate(tree, devices))


@functools.cache
def _identity_pmap(devices: tuple | None):
    """One identity pmap per device set, so replicating again (each epoch) compiles only
    for a new tree structure."""
    return jax.pmap(lambda x: jax.tree.map(jnp.copy, x), axis_name=AXIS, devices=devices)


def unreplicate(tree: Any) -> Any:
    """The first device's copy, as host numpy arrays (also for a pmap over a subset of the
    local devices, where indexing the global array would keep the device axis)."""

    def first(x):
        if isinstance(x, jax.Array) and x.ndim and len(x.addressable_shards) > 1:
            return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])
        return np.asarray(x)[0]

    return jax.tree.map(first, tree)


def shard(batch: Any, num_devices: int | None = None) -> Any:
    """[B, ...] host arrays -> [devices, B / devices, ...]: each device's share of the batch."""
    n = jax.local_device_count() if num_devices is None else num_devices

    def split(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(f"a batch of {x.shape[0]} does not split over {n} devices")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree.map(split, batch)


def unshard(tree: Any) -> Any:
    """[devices, b, ...] -> [devices·b, ...] host arrays (the inverse of `shard`)."""
    return jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), jax.device_get(tree))


def put_sharded(batch: Any, devices=None) -> Any:
    """[B, ...] host arrays -> device arrays [devices, B / devices, ...], each device holding
    its share, laid out as pmap lays out its sharded inputs (so the step neither copies nor
    recompiles). The transfer is asynchronous."""
    devices = jax.local_devices() if devices is None else list(devices)
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    sharding = jax.NamedSharding(mesh, jax.P(AXIS))
    return jax.tree.map(lambda x: jax.device_put(x, sharding), shard(batch, len(devices)))


def prefetch_to_device(batches: Iterable[Any], size: int = 2, devices=None) -> Iterator[Any]:
    """`put_sharded` batches, `size` ahead: when batch n is handed over, batches n+1 ..
    n+size are already on (or on their way to) the devices, so they travel while step n
    runs (flax's jax_utils.prefetch_to_device, on `shard`, refilled before the hand-over)."""
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    iterator = iter(batches)
    queue = collections.deque(put_sharded(b, devices) for b in itertools.islice(iterator, size))
    while queue:
        batch = queue.popleft()
        queue.extend(put_sharded(b, devices) for b in itertools.islice(iterator, 1))
        yield batch
