"""The one place that wires pmap: replicate a pytree over the local devices, shard a host
batch over them, take one copy back, and compile a step ahead.

Everything that runs a pmapped function (the training loop, the embed path, the bench,
the multi-device tests) goes through these, so the layout of replicated arrays and
the shape of per-device batches are decided once. The programs they run are the large
compiles, so importing this module also hands each compile's freed heap back (`heap.py`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np

from leopard_jax import heap

AXIS = "batch"  # the pmapped axis name every collective reduces over
heap.install()


def replicate(tree: Any, devices=None) -> Any:
    """One copy of `tree` per device, laid out exactly as pmap lays out its outputs.

    Sent straight into that layout, from a device axis broadcast over the host arrays (a
    view: nothing is copied on the host). `flax.jax_utils.replicate` gives the copies a
    different sharding from the one a pmapped step returns, so the step compiled on its
    first call would compile again on its second (~20 s for the demo model on CPU); passing
    them through an identity pmap fixed that at the cost of a second copy and that pmap's
    compile (B2 variables, 40 MB: RSS +111 MiB; now +42)."""
    sharding = _device_axis(devices)
    count = sharding.mesh.size

    def put(x):
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x[None], (count, *x.shape)), sharding)

    return jax.tree.map(put, tree)


def _device_axis(devices=None) -> jax.NamedSharding:
    """How pmap lays out its sharded inputs and its outputs: axis 0 over the devices."""
    devices = jax.local_devices() if devices is None else list(devices)
    return jax.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.P(AXIS))


def compile_ahead(pmapped: Any, *args: Any) -> Any:
    """`pmapped` (a `jax.pmap`) compiled now for `args` (arrays, or ShapeDtypeStructs with
    the device axis), to be called in its place; then JAX's in-memory caches are cleared
    and their heap handed back.

    Why: once compiled, a step's jaxprs and StableHLO stay in JAX's tracing and lowering
    caches, which nothing reads again when the compiled program is called directly: ~100
    MiB for the B2 training step, resident through every step (its peak alone on the CPU
    3072-3091 -> 2959-2976 MiB). Clearing is global, so whatever compiled before compiles
    again at its next call: compile the step before the other programs.

    Across processes `pmapped` is returned as it is: only its own call maps each process's
    arrays onto the global ones a compiled program takes."""
    if jax.process_count() > 1:
        return pmapped
    compiled = pmapped.lower(*args).compile()
    jax.clear_caches()
    heap.release()
    return compiled


def unreplicate(tree: Any) -> Any:
    """The first device's copy, as host numpy arrays that own their memory (also for a pmap
    over a subset of the local devices, where indexing the global array would keep the
    device axis).

    Own memory, not views: on CPU a view shares the device buffer, and a donating step that
    finds a buffer still referenced copies it first (~0.1 s for a B2 training state, at the
    first step after every epoch boundary while the checkpoint writer holds the state)."""

    def first(x):
        if isinstance(x, jax.Array) and x.ndim and len(x.addressable_shards) > 1:
            return np.array(np.asarray(x.addressable_shards[0].data)[0])
        return np.array(np.asarray(x)[0])

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
    sharding = _device_axis(devices)
    return jax.tree.map(lambda x: jax.device_put(x, sharding), shard(batch, sharding.mesh.size))


def prefetch_to_device(batches: Iterable[Any], size: int = 2, devices=None) -> DevicePrefetch:
    """`put_sharded` batches, `size` ahead, read and sent by a background thread: when batch
    n is handed over, batches n+1 .. n+size are read (or being read) and on their way to the
    devices, so neither the loader nor the transfer waits in the training loop's thread
    (flax's `jax_utils.prefetch_to_device` on a thread, as big_vision's input). Close it
    (or use it as a context manager) before closing what `batches` reads from."""
    return DevicePrefetch(batches, size, devices)


class DevicePrefetch:
    """The iterator `prefetch_to_device` returns. Order is kept (one reading thread); an
    error raised while reading comes out of `next` in the consumer's thread."""

    _END = object()

    def __init__(self, batches: Iterable[Any], size: int, devices=None):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._ready: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(size + 1)  # the batch handed over + `size` ahead
        self._stop = threading.Event()
        self._done = False
        self._handed_over = False
        self._peeked: list[Any] = []  # the batch `peek` took, until `next` hands it over
        self._thread = threading.Thread(
            target=self._fill, args=(iter(batches), devices), name="device-prefetch", daemon=True
        )
        self._thread.start()

    def _fill(self, iterator: Iterator[Any], devices) -> None:
        try:
            while self._take_slot():
                batch = next(iterator, self._END)
                if batch is self._END:
                    break
                self._ready.put(put_sharded(batch, devices))
            self._ready.put(self._END)
        except BaseException as error:  # handed to the consumer, raised there
            self._ready.put(error)

    def _take_slot(self) -> bool:
        while not self._stop.is_set():
            if self._slots.acquire(timeout=0.1):
                return not self._stop.is_set()
        return False

    def __iter__(self) -> DevicePrefetch:
        return self

    def peek(self) -> Any:
        """The next batch without handing it over: the next `next` returns it (the training
        loop compiles its step for the first batch's shapes before it trains on it)."""
        if not self._peeked:
            self._peeked.append(next(self))
        return self._peeked[0]

    def __next__(self) -> Any:
        if self._peeked:
            return self._peeked.pop()
        if self._done:
            raise StopIteration
        if self._handed_over:
            self._slots.release()  # the consumer is done with the batch handed over last
        item = self._ready.get()
        if item is self._END or isinstance(item, BaseException):
            self._done = True
            self._thread.join()
            if item is self._END:
                raise StopIteration
            raise item
        self._handed_over = True
        return item

    def close(self) -> None:
        """Stop reading ahead and wait for the reading thread (it finishes the batch it is
        reading, if any)."""
        self._stop.set()
        self._done = True
        self._peeked.clear()
        self._thread.join()

    def __enter__(self) -> DevicePrefetch:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
