"""Depthwise convolution: the shifted multiply-add form equals XLA's grouped convolution
(values and gradients, TF-same padding, strides 1 and 2, odd sizes) and a plain loop; and
the compiled training step of an EfficientNetV2 stays below 4x its forward FLOPs; the 1x1
convolution's matrix product and its gradient."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from leopard_jax.models import build_backbone
from leopard_jax.models.efficientnet_v2 import InvertedResidual
from leopard_jax.models.layers import (
    BN_EPS_TF,
    Conv,
    DepthwiseConv,
    batch_norm,
    depthwise_conv_grouped,
    depthwise_conv_shifted,
    pointwise,
    resolve_padding,
)

CASES = [(3, 1, (9, 11)), (3, 2, (9, 11)), (3, 2, (8, 12)), (5, 2, (7, 10)), (5, 1, (6, 6))]


def loop_depthwise(x, kernel, stride, pad):
    """Brute force: every output pixel, channel by channel."""
    xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    k = kernel.shape[0]
    out_h, out_w = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]), np.float64)
    for i in range(out_h):
        for j in range(out_w):
            window = xp[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
            out[:, i, j, :] = np.einsum("bhwc,hwc->bc", window, kernel[:, :, 0, :])
    return out


@pytest.mark.parametrize("k,stride,hw", CASES)
def test_shifted_equals_grouped_and_loop(k, stride, hw):
    rng = np.random.default_rng(k * 10 + stride)
    x = rng.standard_normal((2, *hw, 5)).astype(np.float32)
    kernel = rng.standard_normal((k, k, 1, 5)).astype(np.float32)
    pad = resolve_padding("tf_same", hw, k, stride)
    shifted = np.asarray(depthwise_conv_shifted(x, kernel, stride, pad))
    grouped = np.asarray(depthwise_conv_grouped(x, kernel, stride, pad))
    assert shifted.shape == grouped.shape == (2, -(-hw[0] // stride), -(-hw[1] // stride), 5)
    np.testing.assert_allclose(shifted, grouped, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        shifted, loop_depthwise(x, kernel, stride, pad), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("k,stride,hw", CASES)
def test_shifted_gradients_equal_grouped(k, stride, hw):
    rng = np.random.default_rng(k + stride)
    x = rng.standard_normal((2, *hw, 3)).astype(np.float32)
    kernel = rng.standard_normal((k, k, 1, 3)).astype(np.float32)
    pad = resolve_padding("tf_same", hw, k, stride)
    cot = rng.standard_normal(np.shape(depthwise_conv_grouped(x, kernel, stride, pad))).astype(
        np.float32
    )

    def grads(fn):
        return jax.grad(lambda x, w: jnp.sum(fn(x, w, stride, pad) * cot), argnums=(0, 1))(
            x, kernel
        )

    for a, b in zip(grads(depthwise_conv_shifted), grads(depthwise_conv_grouped)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_module_impls_agree_and_default_by_backend():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 7, 9, 4)), jnp.float32)
    mods = {impl: DepthwiseConv(3, 2, impl=impl) for impl in ("shifted", "grouped")}
    v = mods["shifted"].init(jax.random.PRNGKey(0), x)
    assert v["params"]["kernel"].shape == (3, 3, 1, 4)
    np.testing.assert_allclose(
        mods["shifted"].apply(v, x), mods["grouped"].apply(v, x), rtol=1e-5, atol=1e-5
    )
    expected = "shifted" if jax.default_backend() == "cpu" else "grouped"
    assert DepthwiseConv(3).apply(v, x).shape == (1, 7, 9, 4)
    from leopard_jax.models.layers import depthwise_default_impl

    assert depthwise_default_impl() == expected


def cost_ratio(model, x):
    """(train-step FLOPs / forward FLOPs) from XLA's compiled cost analysis."""
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x, train=False))()

    def loss(params, stats, x):
        y, _ = model.apply(
            {"params": params, "batch_stats": stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.PRNGKey(1)},
        )
        return jnp.sum(y.astype(jnp.float32) ** 2)

    def flops(fn, *args):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    forward = flops(lambda v, x: model.apply(v, x, train=False), variables, x)
    train = flops(jax.grad(loss), variables["params"], variables.get("batch_stats", {}), x)
    return train / forward


def test_training_step_stays_below_4x_forward_flops():
    model = build_backbone("efficientnetv2_b0", num_classes=0, depthwise_impl="shifted")
    assert cost_ratio(model, jnp.ones((1, 32, 64, 4))) < 4.0


@pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the dense-gradient lowering is XLA CPU's"
)
def test_flops_measure_catches_the_grouped_gradient():
    """The measurement above can fail: one MBConv block with XLA's grouped conv costs far
    more than 4x its forward on CPU, the shifted one does not."""
    x = jnp.ones((1, 16, 16, 32))
    assert cost_ratio(OneMBConv("grouped"), x) > 4.0
    assert cost_ratio(OneMBConv("shifted"), x) < 4.0


class OneMBConv(nn.Module):
    """One InvertedResidual block with conv and norm as EfficientNetV2 hands them down."""

    depthwise_impl: str

    @nn.compact
    def __call__(self, x, train: bool):
        return InvertedResidual(
            mid=128,
            out_ch=32,
            kernel=3,
            stride=1,
            se=8,
            residual=True,
            drop_path=0.0,
            conv=Conv,
            norm=batch_norm(train, epsilon=BN_EPS_TF),
            depthwise=functools.partial(DepthwiseConv, impl=self.depthwise_impl),
        )(x, train)


def test_pointwise_gradients_equal_autodiff_and_need_no_transposed_copy():
    """The 1x1 convolution's matrix product: its hand-written kernel gradient equals
    autodiff's, and the compiled gradient reads the output gradient in place (autodiff's
    form made XLA CPU copy it into a transposed layout first)."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 6, 5))
    kernel = jax.random.normal(jax.random.key(1), (5, 7))

    def loss(matmul):
        return lambda x, k: jnp.sum(jnp.tanh(matmul(x, k)) * jnp.arange(7.0))

    plain = functools.partial(jax.lax.dot_general, dimension_numbers=(((3,), (0,)), ((), ())))
    ours = jax.jit(jax.grad(loss(pointwise), argnums=(0, 1)))
    reference = jax.grad(loss(plain), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours(x, kernel), reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    compiled = ours.lower(x, kernel).compile().as_text()
    assert " transpose(" not in compiled
