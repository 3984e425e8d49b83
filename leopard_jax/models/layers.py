"""Building blocks shared by the backbones, written so timm weights drop in unchanged.

Why these exist rather than plain `nn.Conv(padding="SAME")`: TensorFlow's "same" padding
puts the odd pixel after, not before, and timm's `tf_` models depend on that for stride-2
convolutions; torch's batch norm momentum 0.1 is flax's 0.9. Depthwise convolution has
its own implementation because XLA on CPU lowers the gradient of a grouped convolution to
a dense one (about 4x the FLOPs of the whole training step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any
ModuleDef = Any  # a module class or a functools.partial of one, as in flax's examples

# torch momentum 0.1 updates running = 0.9 * running + 0.1 * batch; flax's momentum is the 0.9.
BN_MOMENTUM = 0.9
BN_EPS_TF = 1e-3  # timm's tf_ models
BN_EPS_TORCH = 1e-5  # timm's resnet


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME": output ceil(size / stride), the odd padding pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def resolve_padding(
    padding: str | int, spatial: Sequence[int], kernel: int, stride: int
) -> list[tuple[int, int]]:
    """`"tf_same"` (computed from the static input size) or a symmetric integer pad."""
    if padding == "tf_same":
        return [tf_same_padding(n, kernel, stride) for n in spatial]
    return [(int(padding), int(padding))] * len(spatial)


class Conv(nn.Module):
    """Square-kernel convolution with timm-compatible padding; kernel HWIO, bias optional."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: str | int = "tf_same"
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
            jnp.float32,
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.kernel_size == 1 and self.strides == 1:
            # A matrix product: XLA CPU runs its gradients as fast matmuls, while a 1x1
            # convolution's kernel gradient takes a slow generic path there.
            y = jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
        else:
            pad = resolve_padding(self.padding, x.shape[1:3], self.kernel_size, self.strides)
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                (self.strides, self.strides),
                pad,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def depthwise_default_impl() -> str:
    """`shifted` on CPU (where XLA densifies the grouped conv's gradient), else `grouped`."""
    return "shifted" if jax.default_backend() == "cpu" else "grouped"


def depthwise_conv_grouped(x, kernel, stride: int, pad):
    """Reference: XLA's grouped convolution, one group per channel. kernel [k, k, 1, C]."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=pad,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def depthwise_conv_shifted(x, kernel, stride: int, pad):
    """The same result as a sum over the k*k taps of strided slices of the padded input,
    each scaled per channel. Its gradient is slices/pads and multiplies, so the training
    step costs about 3x the forward on any backend."""
    k = kernel.shape[0]
    xp = jnp.pad(x, ((0, 0), tuple(pad[0]), tuple(pad[1]), (0, 0)))
    out_h = (xp.shape[1] - k) // stride + 1
    out_w = (xp.shape[2] - k) // stride + 1
    out = None
    for i in range(k):
        for j in range(k):
            tap = jax.lax.slice(
                xp,
                (0, i, j, 0),
                (
                    xp.shape[0],
                    i + (out_h - 1) * stride + 1,
                    j + (out_w - 1) * stride + 1,
                    xp.shape[3],
                ),
                (1, stride, stride, 1),
            )
            term = tap * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


DEPTHWISE_IMPLS: dict[str, Callable] = {
    "grouped": depthwise_conv_grouped,
    "shifted": depthwise_conv_shifted,
}


class DepthwiseConv(nn.Module):
    """Depthwise (one filter per channel) convolution, no bias; kernel [k, k, 1, C] as a
    flax grouped `nn.Conv` would store it. `impl=None` picks by backend."""

    kernel_size: int
    strides: int = 1
    padding: str | int = "tf_same"
    impl: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        # He init over one group's fan-out (k·k), as timm's `fix_group_fanout`: flax's
        # "fan_out" of a [k, k, 1, C] kernel is k·k·C, which made the outputs C times too
        # small in variance and left eval-mode batch norm (running var starts at 1) blind
        # for the first ~100 steps.
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
            (self.kernel_size, self.kernel_size, 1, channels),
            jnp.float32,
        )
        pad = resolve_padding(self.padding, x.shape[1:3], self.kernel_size, self.strides)
        impl = DEPTHWISE_IMPLS[self.impl or depthwise_default_impl()]
        return impl(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, pad)


def batch_norm(
    train: bool, *, epsilon: float, dtype: Dtype = jnp.float32, axis_name: str | None = None
) -> ModuleDef:
    """The one batch-norm setting, torch-equivalent: momentum 0.1 (flax's 0.9), two-pass
    variance, fp32 scale/bias/statistics whatever the compute dtype. The top module builds it
    once from `train` and hands it to its blocks, which call `norm(name=...)`.

    `axis_name` (a pmap axis) makes training statistics those of the global batch, so 1 or N
    devices compute the same step."""
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        axis_name=axis_name if train else None,
        use_fast_variance=False,  # two-pass variance: E[x²]−E[x]² cancels badly in float32
        momentum=BN_MOMENTUM,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
    )


class SqueezeExcite(nn.Module):
    """Channel gate from globally pooled features (timm `SqueezeExcite`, SiLU inside)."""

    reduced: int
    conv: ModuleDef = Conv

    @nn.compact
    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.silu(self.conv(self.reduced, 1, use_bias=True, name="conv_reduce")(s))
        s = self.conv(x.shape[-1], 1, use_bias=True, name="conv_expand")(s)
        return x * nn.sigmoid(s)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    rate: float

    @nn.compact
    def __call__(self, x, train: bool):
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(
            self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
        )
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of `divisor`, bumped up if it lost > 10%."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < round_limit * value:
        new += divisor
    return new
