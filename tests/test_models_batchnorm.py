"""Training batch norm with the hand-written gradient (`layers.TrainBatchNorm`) against
flax's `nn.BatchNorm` with the same settings, autodiff's gradient: same variables, same
outputs and running statistics, gradients equal up to float rounding; fp32 and bf16 compute;
and over two devices, where the statistics and their gradient span the global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from leopard_jax.models import layers

EPS = 1e-3


def flax_batch_norm(dtype, axis_name=None):
    return nn.BatchNorm(
        use_running_average=False,
        use_fast_variance=False,
        momentum=layers.BN_MOMENTUM,
        epsilon=EPS,
        axis_name=axis_name,
        dtype=dtype,
        param_dtype=jnp.float32,
    )


def case(shape=(4, 5, 6, 7), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)  # off-centre: the mean matters
    weights = rng.normal(size=shape).astype(np.float32)
    channels = shape[-1]
    variables = {
        "params": {"scale": np.linspace(0.5, 2, channels), "bias": np.linspace(-1, 1, channels)},
        "batch_stats": {"mean": rng.normal(size=channels), "var": rng.uniform(0.5, 2, channels)},
    }
    return x, weights, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), variables)


def loss_and_grads(module, variables, x, weights):
    """A SiLU after the norm, as in the backbone; gradients for params and input."""

    def loss(params, x):
        y, updated = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            mutable=["batch_stats"],
        )
        return jnp.sum(jax.nn.silu(y.astype(jnp.float32)) * weights), (y, updated)

    (value, (y, updated)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x
    )
    return value, y, updated["batch_stats"], grads


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_same_numbers_as_flax_batch_norm(dtype):
    x, weights, variables = case()
    x = jnp.asarray(x, dtype)
    ours = layers.batch_norm(True, epsilon=EPS, dtype=dtype)()
    theirs = flax_batch_norm(dtype)
    init_ours = ours.init(jax.random.key(0), x)
    init_theirs = theirs.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, init_ours) == jax.tree.map(jnp.shape, init_theirs)
    got = loss_and_grads(ours, variables, x, weights)
    want = loss_and_grads(theirs, variables, x, weights)
    assert got[1].dtype == want[1].dtype == dtype
    np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))
    for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2]), strict=True):
        np.testing.assert_array_equal(a, b)  # running statistics
    (g_params, g_x), (w_params, w_x) = got[3], want[3]
    for a, b in zip(jax.tree.leaves(g_params), jax.tree.leaves(w_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    assert g_x.dtype == dtype
    scale = float(jnp.max(jnp.abs(w_x.astype(jnp.float32))))
    np.testing.assert_allclose(
        np.asarray(g_x, np.float32),
        np.asarray(w_x, np.float32),
        atol=scale * (1e-5 if dtype == jnp.float32 else 2**-7),  # a bf16 ulp of the largest
    )


def test_inference_is_flax_batch_norm_on_the_running_statistics():
    x, _, variables = case()
    norm = layers.batch_norm(False, epsilon=EPS)()
    assert isinstance(norm, nn.BatchNorm)  # exported as ONNX BatchNormalization
    got = norm.apply(variables, jnp.asarray(x))
    stats, params = variables["batch_stats"], variables["params"]
    want = (x - stats["mean"]) / np.sqrt(stats["var"] + EPS) * params["scale"] + params["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


TWO_DEVICES = """
import functools, jax, jax.numpy as jnp, numpy as np
import test_models_batchnorm as t
from leopard_jax.models import layers
assert jax.local_device_count() == 2
x, weights, variables = t.case(shape=(6, 3, 4, 5))
def per_device(module):
    def f(x, weights):
        value, y, stats, grads = t.loss_and_grads(module, variables, x, weights)
        return jax.lax.psum(value, "d"), y, stats, grads
    return jax.pmap(f, axis_name="d")(x.reshape(2, 3, 3, 4, 5), weights.reshape(2, 3, 3, 4, 5))
ours = per_device(layers.batch_norm(True, epsilon=t.EPS, axis_name="d")())
theirs = per_device(t.flax_batch_norm(jnp.float32, axis_name="d"))
for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
one = t.loss_and_grads(t.flax_batch_norm(jnp.float32), variables, jnp.asarray(x), weights)
np.testing.assert_allclose(ours[3][1].reshape(6, 3, 4, 5), one[3][1], rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_two_devices_normalise_and_differentiate_over_the_global_batch():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok"]
