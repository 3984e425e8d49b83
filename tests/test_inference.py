"""inference.embed_images, the one embed path: numbers against a numpy forward of the same
model, order kept through padding and device sharding, one compilation per model and batch
shape, and replicated variables (the trainer's) giving the same result."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from leopard_jax import inference, parallel
from leopard_jax.data import augment

H, W, C, DIMS = 2, 3, 4, 5
TRACES = []  # one entry per trace of TinyModel: a trace is a compilation


class TinyModel(nn.Module):
    """Batch norm (running statistics) -> flatten -> Dense: compiles in a blink, and its
    numpy forward below is a few lines."""

    dims: int = DIMS

    @nn.compact
    def __call__(self, x, train: bool = False):
        TRACES.append(x.shape)
        x = nn.BatchNorm(use_running_average=not train, name="norm")(x)
        return nn.Dense(self.dims, name="out")(x.reshape(x.shape[0], -1))


def tiny_variables(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "norm": {"scale": rng.uniform(0.5, 2, C), "bias": rng.normal(size=C)},
            "out": {"kernel": rng.normal(size=(H * W * C, DIMS)), "bias": rng.normal(size=DIMS)},
        },
        "batch_stats": {"norm": {"mean": rng.normal(size=C), "var": rng.uniform(0.5, 2, C)}},
    }


def numpy_forward(variables: dict, images: np.ndarray) -> np.ndarray:
    """The same model in float64 numpy, on the host normalisation (augment.normalize)."""
    p, s = variables["params"], variables["batch_stats"]
    x = augment.normalize(images).astype(np.float64)
    x = (x - s["norm"]["mean"]) / np.sqrt(s["norm"]["var"] + 1e-5) * p["norm"]["scale"]
    x = x + p["norm"]["bias"]
    return x.reshape(len(x), -1) @ p["out"]["kernel"] + p["out"]["bias"]


def random_images(n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, (n, H, W, C), dtype=np.uint8))


def float32(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def test_matches_numpy_forward_in_order_with_padding():
    variables, images = float32(tiny_variables()), random_images(7)
    got = inference.embed_images(TinyModel(), variables, images, batch_size=3)
    assert got.dtype == np.float32 and got.shape == (7, DIMS)
    np.testing.assert_allclose(
        got, numpy_forward(variables, np.stack(images)), rtol=1e-4, atol=1e-4
    )


def test_one_compilation_per_model_and_batch_shape():
    model, variables = TinyModel(dims=DIMS + 1), float32(tiny_variables())
    variables["params"]["out"] = {
        "kernel": np.ones((H * W * C, DIMS + 1), np.float32),
        "bias": np.zeros(DIMS + 1, np.float32),
    }
    before = len(TRACES)
    first = inference.embed_images(model, variables, random_images(7), batch_size=4)
    inference.embed_images(TinyModel(dims=DIMS + 1), variables, random_images(2), batch_size=4)
    replicated = parallel.replicate(variables)
    again = inference.embed_images(
        model, replicated, random_images(7), batch_size=4, replicated=True
    )
    assert len(TRACES) - before == 1  # an equal model is the same cached function
    np.testing.assert_array_equal(again, first)


def test_images_sent_once_embed_as_read_from_the_host():
    """A set kept on the devices (the trainer's held-out set) gives the embeddings the host
    path gives, every time, with no new compilation: same batches, same function."""
    variables, images = float32(tiny_variables()), random_images(7)
    from_host = inference.embed_images(TinyModel(), variables, images, batch_size=3)
    before = len(TRACES)
    on_devices = inference.to_devices(images, batch_size=3)
    assert (on_devices.count, on_devices.size, len(on_devices.batches)) == (7, 3, 3)
    assert all(isinstance(b, jax.Array) and b.dtype == np.uint8 for b in on_devices.batches)
    for _ in range(2):  # kept, not consumed
        again = inference.embed_images(TinyModel(), variables, on_devices, batch_size=3)
        np.testing.assert_array_equal(again, from_host)
    assert len(TRACES) == before
    empty = inference.to_devices([], batch_size=3)
    assert inference.embed_images(TinyModel(), variables, empty, batch_size=3).shape == (0, DIMS)


def test_empty_and_bad_input():
    assert inference.embed_images(TinyModel(), {}, [], batch_size=2).shape == (0, DIMS)
    with pytest.raises(ValueError, match="uint8"):
        inference.embed_images(
            TinyModel(), float32(tiny_variables()), [np.zeros((H, W, C), np.float32)], batch_size=2
        )
    with pytest.raises(ValueError, match="at least 1"):
        inference.embed_images(
            TinyModel(), float32(tiny_variables()), random_images(1), batch_size=0
        )


def test_normalize_on_device_is_augment_normalize():
    images = np.stack(random_images(3))
    expected = augment.normalize(images)
    np.testing.assert_allclose(
        np.asarray(inference.normalize(jnp.asarray(images))), expected, atol=1e-5
    )
    # Channels first (as the ONNX export normalises): each channel keeps its own mean/std.
    nchw = inference.normalize(jnp.asarray(images.transpose(0, 3, 1, 2)), channel_axis=1)
    np.testing.assert_allclose(np.asarray(nchw), expected.transpose(0, 3, 1, 2), atol=1e-5)


def test_batch_rounds_up_to_the_devices():
    assert [inference.device_batch_size(b, 4) for b in (1, 4, 5, 8)] == [4, 4, 8, 8]


MULTI_DEVICE = """
import numpy as np, jax, test_inference as t
from leopard_jax import inference
assert jax.local_device_count() == 2
variables, images = t.float32(t.tiny_variables()), t.random_images(5)
got = inference.embed_images(t.TinyModel(), variables, images, batch_size=3)  # -> 4: 2 per device
np.testing.assert_allclose(got, t.numpy_forward(variables, np.stack(images)), rtol=1e-4, atol=1e-4)
on_devices = inference.to_devices(images, batch_size=3)
assert [b.shape for b in on_devices.batches] == [(2, 2, 2, 3, 4)] * 2  # [devices, per device, ...]
kept = inference.embed_images(t.TinyModel(), variables, on_devices, batch_size=3)
np.testing.assert_array_equal(kept, got)
print("ok", len(t.TRACES))
"""


def test_two_devices_keep_the_order():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    here = pathlib.Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(here), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok", "1"]
