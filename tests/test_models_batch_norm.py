"""layers.BatchNorm (batch norm with its activation fused, hand-written gradient) against
flax's `nn.BatchNorm` followed by the activation: values, running statistics and gradients,
on one shard and over a named axis (global-batch statistics, as under pmap), and the point
of it: its backward pass keeps one activation-sized array, not several."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from leopard_jax.models import layers

EPS = 1e-3
SHARDS = jax.random.normal(jax.random.key(0), (2, 3, 5, 7, 6)) * 2.0 + 1.0  # 2 shards, NHWC
VARIABLES = {
    "params": {"scale": jnp.linspace(0.5, 2.0, 6), "bias": jnp.linspace(-1.0, 1.0, 6)},
    "batch_stats": {"mean": jnp.linspace(-0.2, 0.3, 6), "var": jnp.linspace(0.5, 1.5, 6)},
}


def flax_reference(train: bool, act: str | None, axis_name: str | None = None):
    """flax's batch norm as this package configured it before, then the activation."""
    norm = nn.BatchNorm(
        use_running_average=not train,
        axis_name=axis_name,
        use_fast_variance=False,
        momentum=layers.BN_MOMENTUM,
        epsilon=EPS,
    )
    return lambda variables, x, **kw: _then(norm.apply(variables, x, **kw), act)


def _then(out, act):
    y, updates = out if isinstance(out, tuple) else (out, None)
    y = layers.ACTIVATIONS[act](y)
    return (y, updates) if updates is not None else y


def fused(train: bool, act: str | None, axis_name: str | None = None):
    norm = layers.batch_norm(train, epsilon=EPS, axis_name=axis_name)(act=act)
    return norm.apply


def per_shard_step(apply):
    """(loss, new batch stats, grads w.r.t. variables and input) of one shard, with a
    different loss per shard so that the cross-shard terms of the gradient matter."""

    def loss(variables, x, weight):
        y, updates = apply(variables, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y) * jnp.arange(1.0, 7.0)) * weight, updates

    def step(variables, x, weight):
        (value, updates), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            variables, x, weight
        )
        return value, updates, grads

    return step


def assert_trees_close(ours, reference, rtol=1e-5):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=rtol)


@pytest.mark.parametrize("act", ["silu", "relu", None])
def test_training_mode_matches_flax_on_one_shard(act):
    x, weight = SHARDS[0], jnp.float32(1.0)
    ours = jax.jit(per_shard_step(fused(True, act)))(VARIABLES, x, weight)
    reference = jax.jit(per_shard_step(flax_reference(True, act)))(VARIABLES, x, weight)
    assert_trees_close(ours, reference)


@pytest.mark.parametrize("act", ["silu", None])
def test_global_batch_statistics_and_gradients_match_flax_over_a_named_axis(act):
    """vmap with an axis name runs the collectives as pmap does over two devices."""
    weights = jnp.array([1.0, 3.0])

    def over_shards(apply):
        step = per_shard_step(apply)
        return jax.jit(jax.vmap(step, in_axes=(None, 0, 0), axis_name="shards"))

    ours = over_shards(fused(True, act, "shards"))(VARIABLES, SHARDS, weights)
    reference = over_shards(flax_reference(True, act, "shards"))(VARIABLES, SHARDS, weights)
    assert_trees_close(ours, reference)
    stats = ours[1]["batch_stats"]  # both shards update with the global batch's statistics
    np.testing.assert_array_equal(stats["mean"][0], stats["mean"][1])


@pytest.mark.parametrize("act", ["silu", None])
def test_eval_mode_uses_the_running_statistics_like_flax(act):
    ours = fused(False, act)(VARIABLES, SHARDS[0])
    assert_trees_close(ours, flax_reference(False, act)(VARIABLES, SHARDS[0]))


def test_bfloat16_inputs_give_bfloat16_outputs_and_gradients():
    x = SHARDS[0].astype(jnp.bfloat16)
    norm = layers.batch_norm(True, epsilon=EPS, dtype=jnp.bfloat16)(act="silu")
    y, _ = norm.apply(VARIABLES, x, mutable=["batch_stats"])
    dx = jax.grad(lambda x: norm.apply(VARIABLES, x, mutable=["batch_stats"])[0].sum())(x)
    assert y.dtype == dx.dtype == jnp.bfloat16
    reference = flax_reference(True, "silu")(VARIABLES, SHARDS[0], mutable=["batch_stats"])[0]
    np.testing.assert_allclose(np.asarray(y, np.float32), reference, atol=0.05)


def test_the_backward_pass_keeps_one_activation_sized_array():
    """What the fused gradient is for: autodiff of batch norm + SiLU keeps x − mean, the
    normalised x and the pre-activation; the fused one keeps x and per-channel numbers."""

    def residuals(apply):
        def f(x):
            return apply(VARIABLES, x, mutable=["batch_stats"])[0]

        _, vjp = jax.vjp(f, SHARDS[0])
        return [leaf for leaf in jax.tree.leaves(vjp) if leaf.shape == SHARDS[0].shape]

    assert len(residuals(flax_reference(True, "silu"))) >= 2
    assert len(residuals(fused(True, "silu"))) == 1


# --- a deferred batch norm + activation (`defer=True`) applied by the convolution after it ---

CONVS = {
    "pointwise": lambda dtype: layers.Conv(6, 1, dtype=dtype),
    "3x3 stride 2": lambda dtype: layers.Conv(6, 3, 2, dtype=dtype),
    "depthwise": lambda dtype: layers.DepthwiseConv(3, impl="shifted", dtype=dtype),
}


class NormActConv(nn.Module):
    """Training-mode batch norm + SiLU, then a convolution; `defer` hands it the NormAct."""

    conv: str
    defer: bool
    axis_name: str | None = None
    layers: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for _ in range(self.layers):
            norm = layers.batch_norm(True, epsilon=EPS, dtype=self.dtype, axis_name=self.axis_name)
            x = CONVS[self.conv](self.dtype)(norm(act="silu", defer=self.defer)(x))
        return x


def norm_act_conv_variables(conv: str):
    return NormActConv(conv, defer=False).init(jax.random.key(1), SHARDS[0])


@pytest.mark.parametrize("conv", sorted(CONVS))
def test_a_deferred_activation_gives_the_same_values_and_gradients(conv):
    variables, x, weight = norm_act_conv_variables(conv), SHARDS[0], jnp.float32(1.0)
    plain = jax.jit(per_shard_step(NormActConv(conv, defer=False).apply))(variables, x, weight)
    ours = jax.jit(per_shard_step(NormActConv(conv, defer=True).apply))(variables, x, weight)
    assert_trees_close(ours, plain)


def test_a_deferred_activation_over_a_named_axis_gives_the_same_gradients():
    variables, weights = norm_act_conv_variables("pointwise"), jnp.array([1.0, 3.0])

    def over_shards(defer):
        step = per_shard_step(NormActConv("pointwise", defer, axis_name="shards").apply)
        return jax.jit(jax.vmap(step, in_axes=(None, 0, 0), axis_name="shards"))

    assert_trees_close(
        over_shards(True)(variables, SHARDS, weights),
        over_shards(False)(variables, SHARDS, weights),
    )


def test_a_deferred_activation_in_bfloat16_gives_bfloat16_gradients_close_to_float32():
    variables, x = norm_act_conv_variables("pointwise"), SHARDS[0]

    def input_grad(dtype):
        model = NormActConv("pointwise", defer=True, dtype=dtype)

        def loss(x):
            y, _ = model.apply(variables, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y.astype(jnp.float32)))

        return jax.grad(loss)(x.astype(dtype))

    bf16, f32 = input_grad(jnp.bfloat16), input_grad(jnp.float32)
    assert bf16.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(f32)))
    np.testing.assert_allclose(np.asarray(bf16, np.float32) / scale, f32 / scale, atol=0.05)


def test_the_convolution_after_a_deferred_activation_does_not_keep_it():
    """Plain, the backward pass keeps batch norm's input and the activation (the
    convolution's input); deferred, only batch norm's input."""
    variables = norm_act_conv_variables("pointwise")

    def activation_sized_residuals(defer):
        def f(x):
            return NormActConv("pointwise", defer).apply(variables, x, mutable=["batch_stats"])[0]

        _, vjp = jax.vjp(f, SHARDS[0])
        return [leaf for leaf in jax.tree.leaves(vjp) if leaf.shape == SHARDS[0].shape]

    assert len(activation_sized_residuals(False)) == 2
    assert len(activation_sized_residuals(True)) == 1


def test_xla_does_not_merge_the_recomputed_activation_with_the_forward_one():
    """The compiled gradient of four BN-SiLU → 1x1 layers needs less scratch memory
    deferred: XLA's CSE would keep the forward's activations if the recomputation in the
    backward pass were not tied to the incoming gradient."""
    x = jax.random.normal(jax.random.key(2), (8, 32, 32, 6))

    def temp_bytes(defer):
        model = NormActConv("pointwise", defer, layers=4)
        variables = model.init(jax.random.key(1), x)

        def loss(params):
            y, _ = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y))

        compiled = jax.jit(jax.grad(loss)).lower(variables["params"]).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    activation = x.size * x.dtype.itemsize
    assert temp_bytes(True) <= temp_bytes(False) - 2 * activation
