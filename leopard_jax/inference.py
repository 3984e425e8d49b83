"""The one embed path: uint8 images -> float32 unit embeddings, sharded over local devices.

`embed` (an exported model), the training loop's held-out evaluation (its replicated state)
and the bench all call `embed_images`, so what is measured, evaluated and shipped is one
computation:

- pmapped over `parallel.AXIS`; each batch is split over the local devices with
  `parallel.shard` and its rows put back in order with `parallel.unshard`;
- one fixed batch shape (rounded up to a multiple of the device count, the last batch
  zero-padded and its extra rows dropped), and the pmapped function cached per model, so a
  dataset of any size, and the trainer's evaluation every epoch, compile once;
- uint8 crosses to the device and is normalised there (a quarter of float32's traffic),
  with the training input's constants (`augment.MEAN`, `augment.STD`);
- the next READ_AHEAD batches are read, stacked and sent to the devices by the training
  input's own read-ahead thread (`parallel.prefetch_to_device`) while the devices run this
  one; a set embedded every epoch (the trainer's held-out set) can be sent once
  (`to_devices`) and embedded from the devices after that.

`embed_images_onnx` is the same contract on ONNX Runtime (a file from `leopard_jax.export`,
which holds the same normalisation), for CPUs, where ONNX Runtime's convolutions beat XLA's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from tqdm import tqdm

from leopard_jax import parallel
from leopard_jax.data import augment

READ_AHEAD = 2  # batches read ahead of the one on the devices, as the training input


def normalize(images: jax.Array, channel_axis: int = -1) -> jax.Array:
    """uint8 [..., C] -> float32 (x/255 - MEAN) / STD: `augment.normalize` on the device.
    `channel_axis` names where C is otherwise (the ONNX export normalises NCHW)."""
    trailing = (1,) * (images.ndim - 1 - channel_axis % images.ndim)
    scale = jnp.asarray(1.0 / (255.0 * augment.STD), jnp.float32).reshape(-1, *trailing)
    offset = jnp.asarray(-augment.MEAN / augment.STD, jnp.float32).reshape(-1, *trailing)
    return images.astype(jnp.float32) * scale + offset


@functools.lru_cache(maxsize=8)
def embed_fn(model: nn.Module) -> Callable[[Any, jax.Array], jax.Array]:
    """pmap(replicated variables, uint8 [devices, b, H, W, C]) -> [devices, b, D], one per
    model (flax modules hash by their settings), so every call reuses its compilation."""

    def forward(variables, images):
        return model.apply(variables, normalize(images), train=False)

    return jax.pmap(forward, axis_name=parallel.AXIS)


def device_batch_size(batch_size: int, num_devices: int) -> int:
    """`batch_size` rounded up to a multiple of `num_devices` (each device gets equal rows)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return -(-batch_size // num_devices) * num_devices


def host_batch(images: Sequence[np.ndarray], start: int, size: int) -> np.ndarray:
    """uint8 [size, H, W, C]: images[start : start + size], zero rows after the last image."""
    batch = np.stack([np.asarray(images[i]) for i in range(start, min(start + size, len(images)))])
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != len(augment.MEAN):
        raise ValueError(
            f"expected uint8 H×W×{len(augment.MEAN)} images (R, G, B, edge), "
            f"got {batch.dtype} {batch.shape[1:]}"
        )
    if len(batch) < size:
        pad = np.zeros((size - len(batch), *batch.shape[1:]), batch.dtype)
        batch = np.concatenate([batch, pad])
    return batch


@dataclasses.dataclass(frozen=True)
class DeviceBatches:
    """A set of images already on the local devices, as `embed_images` sends them: sharded
    uint8 batches of `size` images (the last zero-padded), `count` images in all. For a set
    embedded again and again (the trainer's held-out set, every epoch), which then never
    re-crosses the host-device link. `to_devices` builds it."""

    batches: tuple[jax.Array, ...]
    count: int
    size: int


def _batch_starts(n: int, batch_size: int) -> tuple[range, int]:
    size = device_batch_size(batch_size, jax.local_device_count())
    return range(0, n, size), size


def _read_ahead(images: Sequence[np.ndarray], starts: range, size: int):
    """The read-ahead thread over `images`: sharded device batches, READ_AHEAD ahead."""
    host_batches = (host_batch(images, start, size) for start in starts)
    return parallel.prefetch_to_device(host_batches, size=READ_AHEAD)


def to_devices(images: Sequence[np.ndarray], *, batch_size: int) -> DeviceBatches:
    """All of `images` read once onto the local devices, batched as `embed_images` with
    this `batch_size` would batch them."""
    starts, size = _batch_starts(len(images), batch_size)
    with _read_ahead(images, starts, size) as batches:
        return DeviceBatches(tuple(batches), len(images), size)


def embed_images(
    model: nn.Module,
    variables: Any,
    images: Sequence[np.ndarray] | DeviceBatches,
    *,
    batch_size: int,
    replicated: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """float32 [N, D] embeddings of uint8 H×W×C `images` (random access, e.g. a
    RecordSource, or already on the devices: `to_devices`), in order.

    `variables` is {"params", "batch_stats"} as host arrays, or already replicated over the
    local devices (`replicated=True`, e.g. the training loop's state).
    """
    if isinstance(images, DeviceBatches):  # batched when it was sent
        n, size = images.count, images.size
        starts = range(0, n, size)
        read = functools.partial(contextlib.nullcontext, images.batches)
    else:
        n = len(images)
        starts, size = _batch_starts(n, batch_size)
        read = functools.partial(_read_ahead, images, starts, size)
    if n == 0:
        return np.zeros((0, model.dims), np.float32)
    forward = embed_fn(model)
    if not replicated:
        variables = parallel.replicate(variables)

    out: list[np.ndarray] = []
    with read() as batches, tqdm(total=n, desc="embed", unit="img", disable=not progress) as bar:

        def collect(pending: tuple[int, jax.Array]) -> None:
            count, result = pending
            out.append(parallel.unshard(result)[:count])
            bar.update(count)

        pending = None
        for start, batch in zip(starts, batches, strict=True):
            result = forward(variables, batch)  # asynchronous
            if pending is not None:
                collect(pending)  # waits for the previous batch while this one runs
            pending = (min(size, n - start), result)
        collect(pending)
    return np.concatenate(out).astype(np.float32, copy=False)


def embed_images_onnx(
    session: Any,
    images: Sequence[np.ndarray],
    *,
    batch_size: int,
    progress: bool = False,
) -> np.ndarray:
    """float32 [N, D] embeddings of uint8 H×W×C `images`, in order, by an ONNX Runtime
    `session` of an exported model (`export.load`): `embed_images` on ONNX Runtime."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = len(images)
    (output,) = session.get_outputs()
    if n == 0:
        return np.zeros((0, output.shape[-1]), np.float32)
    name = session.get_inputs()[0].name
    out: list[np.ndarray] = []
    with (
        concurrent.futures.ThreadPoolExecutor(1) as reader,
        tqdm(total=n, desc="embed", unit="img", disable=not progress) as bar,
    ):
        # the dynamic batch axis takes the short last batch as it is: no padding
        next_batch = reader.submit(host_batch, images, 0, min(batch_size, n))
        for start in range(0, n, batch_size):
            batch = next_batch.result()
            following = start + batch_size
            if following < n:
                next_batch = reader.submit(
                    host_batch, images, following, min(batch_size, n - following)
                )
            out.append(session.run(None, {name: batch})[0])
            bar.update(len(batch))
    return np.concatenate(out).astype(np.float32, copy=False)
