"""Building blocks shared by the backbones, written so timm weights drop in unchanged.

Why these exist rather than plain `nn.Conv(padding="SAME")`: TensorFlow's "same" padding
puts the odd pixel after, not before, and timm's `tf_` models depend on that for stride-2
convolutions; torch's batch norm momentum 0.1 is flax's 0.9. Depthwise convolution has
its own implementation because XLA on CPU lowers the gradient of a grouped convolution to
a dense one (about 4x the FLOPs of the whole training step).
"""

from __future__ import annotations

import dataclasses
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


def pointwise_impl() -> str:
    """How `Conv` computes a 1x1, stride-1 convolution: `matmul` (a dot over channels, for
    XLA's gradients) or `conv`. The ONNX export traces `conv`, so ONNX Runtime sees a real
    `Conv` it can fuse with batch norm and SiLU, in one NCHW layout with no transposes."""
    return "matmul"


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
        kernel = kernel.astype(self.dtype)
        if self.kernel_size == 1 and self.strides == 1 and pointwise_impl() == "matmul":
            # A matrix product: XLA CPU runs its gradients as fast matmuls, while a 1x1
            # convolution's kernel gradient takes a slow generic path there.
            y = apply_conv(pointwise, x, kernel[0, 0], dtype=self.dtype)
        else:
            pad = resolve_padding(self.padding, x.shape[1:3], self.kernel_size, self.strides)
            conv = functools.partial(conv_xla, stride=self.strides, pad=pad)
            y = apply_conv(conv, x, kernel, dtype=self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def apply_conv(conv: Callable, x, kernel, *, dtype):
    """conv(x, kernel) for an array x, or through `consume_norm_act` for a `NormAct`."""
    if isinstance(x, NormAct):
        return consume_norm_act(lambda y, k: conv(y.astype(dtype), k), x, kernel)
    return conv(x.astype(dtype), kernel)


@jax.custom_vjp
def pointwise(x, kernel):
    """x[..., Cin] · kernel[Cin, Cout]: a 1x1 convolution as a matrix product, with the
    kernel gradient written as x(rows, Cin)ᵀ · dy(rows, Cout). Autodiff's transpose rule
    produced it as (dyᵀ · x)ᵀ, which XLA CPU ran by first copying the whole output gradient
    into a transposed layout: ~10% of B2's training step in such copies (issue 20)."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _pointwise_fwd(x, kernel):
    return pointwise(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, dy):
    x, kernel = residuals
    dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
    rows_x, rows_dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dkernel = jax.lax.dot_general(rows_x, rows_dy, (((0,), (0,)), ((), ())))
    return dx, dkernel.astype(kernel.dtype)


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def conv_xla(x, kernel, stride: int, pad):
    """XLA's convolution, NHWC input, HWIO kernel; its gradients are XLA's too."""
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


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


def shifted_taps(x, kernel, stride: int, pad):
    """The k*k strided views of the padded `x` that meet each kernel tap, in (i, j) order."""
    k = kernel.shape[0]
    xp = jnp.pad(x, ((0, 0), tuple(pad[0]), tuple(pad[1]), (0, 0)))
    out_h = (xp.shape[1] - k) // stride + 1
    out_w = (xp.shape[2] - k) // stride + 1
    for i in range(k):
        for j in range(k):
            end = (xp.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1)
            yield jax.lax.slice(xp, (0, i, j, 0), (*end, xp.shape[3]), (1, stride, stride, 1))


def shifted_sum(x, kernel, stride: int, pad):
    """sum over taps of view(i, j) * kernel[i, j]: the depthwise convolution's value."""
    k = kernel.shape[0]
    terms = (
        tap * kernel[n // k, n % k, 0] for n, tap in enumerate(shifted_taps(x, kernel, stride, pad))
    )
    return functools.reduce(jnp.add, terms)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv_shifted(x, kernel, stride: int, pad):
    """The same result as a sum over the k*k taps of strided slices of the padded input,
    each scaled per channel, with a hand-written gradient: the input gradient is the same
    shifted sum over the (stride-dilated) output gradient with the flipped kernel, the
    kernel gradient k*k fused multiply-reductions over views of the input. Autodiff of
    the sum kept all k*k views of every layer's input alive for the backward pass and
    scattered into padded copies; this runs forward and backward at slice speed."""
    return shifted_sum(x, kernel, stride, pad)


def _shifted_fwd(x, kernel, stride, pad):
    return shifted_sum(x, kernel, stride, pad), (x, kernel)


def _shifted_bwd(stride, pad, residuals, dy):
    x, kernel = residuals
    k = kernel.shape[0]
    # Along each axis y[o] = sum_i xp[o*s + i] w[i], xp = x padded by (p0, p1), so
    # dx[m] = sum_i' z[m + i'] w[k-1-i'] where z is dy dilated by s (s-1 zeros between)
    # and padded by k-1-p0 before, to length len(x) + k - 1: a stride-1 shifted sum
    # with the flipped kernel.
    spatial = []
    for axis in (1, 2):
        before = k - 1 - pad[axis - 1][0]
        dilated = (dy.shape[axis] - 1) * stride + 1
        spatial.append((before, x.shape[axis] + k - 1 - before - dilated, stride - 1))
    z = jax.lax.pad(dy, jnp.zeros((), dy.dtype), [(0, 0, 0), *spatial, (0, 0, 0)])
    dx = shifted_sum(z, kernel[::-1, ::-1], 1, ((0, 0), (0, 0)))
    taps = shifted_taps(x, kernel, stride, pad)
    dkernel = jnp.stack(
        [jnp.sum(tap * dy, axis=(0, 1, 2), dtype=jnp.float32) for tap in taps]
    ).reshape(kernel.shape)
    return dx, dkernel.astype(kernel.dtype)


depthwise_conv_shifted.defvjp(_shifted_fwd, _shifted_bwd)


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
        pad = tuple(map(tuple, pad))  # hashable: a static argument of the custom gradient
        conv = functools.partial(impl, stride=self.strides, pad=pad)
        return apply_conv(conv, x, kernel.astype(self.dtype), dtype=self.dtype)


def batch_norm(
    train: bool, *, epsilon: float, dtype: Dtype = jnp.float32, axis_name: str | None = None
) -> ModuleDef:
    """The one batch-norm setting, torch-equivalent: momentum 0.1 (flax's 0.9), two-pass
    variance, fp32 scale/bias/statistics whatever the compute dtype. The top module builds it
    once from `train` and hands it to its blocks, which call `norm(name=...)` or, with the
    activation that follows fused in, `norm(name=..., act="silu")`.

    `axis_name` (a pmap axis) makes training statistics those of the global batch, so 1 or N
    devices compute the same step."""
    return functools.partial(
        BatchNorm,
        use_running_average=not train,
        axis_name=axis_name if train else None,
        momentum=BN_MOMENTUM,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
    )


ACTIVATIONS: dict[str | None, Callable] = {None: lambda z: z, "silu": nn.silu, "relu": nn.relu}


def _activation_grad(act: str | None, z):
    """d act(z) / dz, from the pre-activation alone (what the fused backward recomputes)."""
    if act is None:
        return jnp.ones_like(z)
    if act == "relu":
        return (z > 0).astype(z.dtype)
    s = jax.nn.sigmoid(z)
    return s * (1 + z * (1 - s))


def batch_moments(x, axis_name: str | None = None):
    """float32 per-channel mean and two-pass (biased) variance over all but the last axis,
    of the global batch when `axis_name` names a pmap axis: E[x²]−E[x]² cancels badly in
    float32, as flax's `use_fast_variance=False`."""
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = xf.mean(axes)
    if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
    var = jnp.square(xf - mean).mean(axes)
    if axis_name is not None:
        var = jax.lax.pmean(var, axis_name)
    return mean, var


def _normalize_act(x, scale, bias, mean, rstd, act: str | None):
    """act((x − mean)·rstd·scale + bias), float32."""
    return ACTIVATIONS[act]((x.astype(jnp.float32) - mean) * (rstd * scale) + bias)


def batch_norm_act(x, scale, bias, epsilon: float, act: str | None, axis_name: str | None):
    """Training-mode batch norm over the batch's own statistics (of the global batch when
    `axis_name` names a pmap axis), then `act`, not applied yet: (`NormAct`, the batch
    variance, for the running average). No gradient flows through the statistics:
    `normalize_act`'s gradient already has their part."""
    mean, var = batch_moments(jax.lax.stop_gradient(x), axis_name)
    rstd = jax.lax.rsqrt(var + epsilon)
    return NormAct(x, scale, bias, mean, rstd, act, axis_name), var


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def normalize_act(x, scale, bias, mean, rstd, act: str | None, axis_name: str | None):
    """act((x − mean)·rstd·scale + bias) for `mean`, `rstd` the batch statistics of this
    same `x` (over `axis_name`'s global batch), with batch norm's whole gradient: dx
    includes the paths through the statistics, which therefore get none. The backward pass
    keeps only `x` and two numbers per channel and recomputes the normalised input and the
    activation's derivative from them, in two passes (the per-channel sums, then dx).
    Autodiff of the plain composition kept x − mean, the normalised x and the
    pre-activation alive for every layer (issue 20: the B2 training step's buffers)."""
    return _normalize_act(x, scale, bias, mean, rstd, act).astype(x.dtype)


def _normalize_act_fwd(x, scale, bias, mean, rstd, act, axis_name):
    return normalize_act(x, scale, bias, mean, rstd, act, axis_name), (x, scale, bias, mean, rstd)


def _normalize_act_bwd(act, axis_name, residuals, dy):
    x, scale, bias, mean, rstd = residuals
    dy = dy.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    z = xhat * scale + bias
    dz = dy * _activation_grad(act, z)
    axes = tuple(range(x.ndim - 1))
    dbias, dscale = dz.sum(axes), (dz * xhat).sum(axes)
    count = x.size // x.shape[-1]
    mean_dz, mean_dz_xhat = dbias / count, dscale / count
    if axis_name is not None:  # the statistics were the global batch's
        mean_dz = jax.lax.pmean(mean_dz, axis_name)
        mean_dz_xhat = jax.lax.pmean(mean_dz_xhat, axis_name)
    dx = (scale * rstd) * (dz - mean_dz - xhat * mean_dz_xhat)
    return dx.astype(x.dtype), dscale, dbias, jnp.zeros_like(mean), jnp.zeros_like(rstd)


normalize_act.defvjp(_normalize_act_fwd, _normalize_act_bwd)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("x", "scale", "bias", "mean", "rstd"),
    meta_fields=("act", "axis_name"),
)
@dataclasses.dataclass(frozen=True)
class NormAct:
    """A training-mode batch norm + activation not applied yet: act((x − mean)·rstd·scale +
    bias), with `mean`, `rstd` the batch statistics of `x`. `value()` applies it; a
    convolution handed one applies it through `consume_norm_act`."""

    x: jax.Array
    scale: jax.Array
    bias: jax.Array
    mean: jax.Array
    rstd: jax.Array
    act: str | None
    axis_name: str | None

    @property
    def shape(self):
        return self.x.shape

    def value(self):
        """The activation (its gradient is batch norm's whole gradient, `normalize_act`)."""
        return normalize_act(
            self.x, self.scale, self.bias, self.mean, self.rstd, self.act, self.axis_name
        )


def materialize(x):
    """x itself, or the activation a `NormAct` stands for."""
    return x.value() if isinstance(x, NormAct) else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def consume_norm_act(consumer: Callable, normed: NormAct, *args):
    """consumer(normed.value(), *args), whose backward pass recomputes the activation from
    `normed` instead of keeping it. Why: a convolution keeps its input for its kernel
    gradient, and batch norm's gradient keeps its own input, so each conv → BN-act → conv
    kept two activation-sized arrays per layer; this keeps one. Issue 20: the B2 training
    step's temporaries 1461 → 1269 MiB, the step no slower."""
    return consumer(normed.value(), *args)


def _consume_norm_act_fwd(consumer, normed, *args):
    return consume_norm_act(consumer, normed, *args), (normed, args)


def _consume_norm_act_bwd(consumer, residuals, dout):
    normed, args = residuals
    # Tie the recomputation to dout: XLA's CSE would otherwise merge it with the forward's
    # activation, which would then stay alive for the backward pass after all.
    normed, dout = jax.lax.optimization_barrier((normed, dout))
    y, norm_act_vjp = jax.vjp(NormAct.value, normed)
    _, consumer_vjp = jax.vjp(consumer, y, *args)
    dy, *dargs = consumer_vjp(dout)
    return (*norm_act_vjp(dy), *dargs)


consume_norm_act.defvjp(_consume_norm_act_fwd, _consume_norm_act_bwd)


class BatchNorm(nn.BatchNorm):
    """flax's `nn.BatchNorm` with the activation after it fused in (`act`: None, "silu",
    "relu"). Inference is flax's own (so jax2onnx still exports a BatchNormalization that
    ONNX Runtime folds into the convolution before it); training goes through
    `batch_norm_act` and `normalize_act`'s hand-written gradient, with flax's parameters,
    statistics and running-average update. `defer=True`: training returns the `NormAct`
    itself, for the convolution after it to apply (`consume_norm_act`)."""

    act: str | None = None
    defer: bool = False

    @nn.compact
    def __call__(self, x):
        if self.use_running_average:
            return ACTIVATIONS[self.act](super().__call__(x))
        features = (x.shape[-1],)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        axis_name = None if self.is_initializing() else self.axis_name
        normed, var = batch_norm_act(x, scale, bias, self.epsilon, self.act, axis_name)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * normed.mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        if self.defer:
            return normed
        return normed.value().astype(self.dtype or x.dtype)


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
