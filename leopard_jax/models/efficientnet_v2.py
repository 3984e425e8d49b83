"""EfficientNetV2 B0-B3, layer for layer timm's `tf_efficientnetv2_b0..b3`.

Submodule names follow timm's state-dict keys with `.<index>` written `_<index>`
(`blocks.3.0.conv_dw.weight` is `blocks_3_0/conv_dw/kernel`), so `convert.py` maps weights
by name alone. Any number of input channels; `dtype=bfloat16` computes in bf16 with fp32
parameters and batch-norm statistics.

As in flax's imagenet example, `EfficientNetV2` sets `conv`, `depthwise` and `norm` (bound to
`train`) once and hands them to the blocks; `train` reaches a block only for stochastic depth.
A batch norm + SiLU whose output only feeds a convolution is written `norm(...,
defer=True)`: in training the convolution applies it and recomputes it in the backward
pass instead of keeping it (`layers.NormAct`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from leopard_jax.models.layers import (
    BN_EPS_TF,
    Conv,
    DepthwiseConv,
    DropPath,
    ModuleDef,
    SqueezeExcite,
    batch_norm,
    make_divisible,
    materialize,
)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One row of timm's arch_def: block type (cn = conv-bn-act, er = fused MBConv,
    ir = MBConv), repeats, kernel, stride of the first block, expansion, width, SE ratio."""

    block: str
    repeats: int
    kernel: int
    stride: int
    expand: int
    width: int
    se: float = 0.0


# timm `_gen_efficientnetv2_base`: cn_r1_k3_s1_e1_c16_skip, er_r2_k3_s2_e4_c32, ...
BASE_STAGES = (
    Stage("cn", 1, 3, 1, 1, 16),
    Stage("er", 2, 3, 2, 4, 32),
    Stage("er", 2, 3, 2, 4, 48),
    Stage("ir", 3, 3, 2, 4, 96, 0.25),
    Stage("ir", 5, 3, 1, 6, 112, 0.25),
    Stage("ir", 8, 3, 2, 6, 192, 0.25),
)

# variant -> (channel multiplier, depth multiplier)
VARIANTS = {"b0": (1.0, 1.0), "b1": (1.0, 1.1), "b2": (1.1, 1.2), "b3": (1.2, 1.4)}


def round_width(channels: int, multiplier: float) -> int:
    """timm `round_channels(..., round_limit=0.)`: nearest multiple of 8, never bumped."""
    return make_divisible(channels * multiplier, 8, round_limit=0.0)


def block_plan(variant: str) -> list[dict[str, Any]]:
    """The flat list of blocks (name, type, in/out widths, stride...) for a variant."""
    width_mult, depth_mult = VARIANTS[variant]
    plan = []
    in_ch = round_width(32, width_mult)
    for s, stage in enumerate(BASE_STAGES):
        out_ch = round_width(stage.width, width_mult)
        for i in range(math.ceil(stage.repeats * depth_mult)):
            stride = stage.stride if i == 0 else 1
            mid = make_divisible(in_ch * stage.expand)
            # timm computes SE width from the block input: round(mid * se / expand)
            se = round(mid * stage.se / stage.expand) if stage.se else 0
            plan.append(
                dict(
                    name=f"blocks_{s}_{i}",
                    block=stage.block,
                    kernel=stage.kernel,
                    stride=stride,
                    in_ch=in_ch,
                    mid=mid,
                    out_ch=out_ch,
                    se=se,
                    residual=stride == 1 and in_ch == out_ch,
                )
            )
            in_ch = out_ch
    return plan


class ConvBnAct(nn.Module):
    """timm `ConvBnAct` (stage 0): k x k conv, BN, SiLU, residual when shapes allow."""

    out_ch: int
    kernel: int
    stride: int
    residual: bool
    drop_path: float
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool):
        y = self.conv(self.out_ch, self.kernel, self.stride, name="conv")(x)
        y = self.norm(name="bn1", act="silu")(y)
        if self.residual:
            y = DropPath(self.drop_path)(y, train) + materialize(x)
        return y


class EdgeResidual(nn.Module):
    """timm `EdgeResidual` (fused MBConv): k x k expansion conv, BN-SiLU, 1x1 projection, BN."""

    mid: int
    out_ch: int
    kernel: int
    stride: int
    residual: bool
    drop_path: float
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool):
        y = self.conv(self.mid, self.kernel, self.stride, name="conv_exp")(x)
        y = self.norm(name="bn1", act="silu", defer=True)(y)
        y = self.norm(name="bn2")(self.conv(self.out_ch, 1, name="conv_pwl")(y))
        if self.residual:
            y = DropPath(self.drop_path)(y, train) + materialize(x)
        return y


class InvertedResidual(nn.Module):
    """timm `InvertedResidual` (MBConv): 1x1 expansion, depthwise k x k, squeeze-excite,
    1x1 projection."""

    mid: int
    out_ch: int
    kernel: int
    stride: int
    se: int
    residual: bool
    drop_path: float
    conv: ModuleDef
    norm: ModuleDef
    depthwise: ModuleDef  # DepthwiseConv with the chosen `impl`

    @nn.compact
    def __call__(self, x, train: bool):
        y = self.norm(name="bn1", act="silu", defer=True)(self.conv(self.mid, 1, name="conv_pw")(x))
        y = self.depthwise(self.kernel, self.stride, name="conv_dw")(y)
        y = self.norm(name="bn2", act="silu")(y)
        if self.se:
            y = SqueezeExcite(self.se, conv=self.conv, name="se")(y)
        y = self.norm(name="bn3")(self.conv(self.out_ch, 1, name="conv_pwl")(y))
        if self.residual:
            y = DropPath(self.drop_path)(y, train) + materialize(x)
        return y


class EfficientNetV2(nn.Module):
    """Stem, the six stages, 1x1 head conv, global average pool, optional classifier.

    `num_classes=0` returns the pooled features ([B, num_features]). Stochastic depth
    grows linearly with block index up to `drop_path_rate`, as timm does. `stem_padding`
    is timm's TF-"same" by default; 0 (no padding) reproduces spotID's multi-channel
    models, whose stem is a plain `nn.Conv2d` that copied `Conv2dSame`'s stored (0, 0).
    """

    variant: str = "b2"
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    depthwise_impl: str | None = None  # see layers.DEPTHWISE_IMPLS; None picks by backend
    stem_padding: str | int = "tf_same"  # or a symmetric integer pad
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None  # pmap axis for global-batch statistics

    @property
    def num_features(self) -> int:
        return round_width(1280, VARIANTS[self.variant][0])

    @nn.compact
    def __call__(self, x, train: bool):
        if self.stem_padding != "tf_same" and not isinstance(self.stem_padding, int):
            raise ValueError(
                f"stem_padding {self.stem_padding!r}: use 'tf_same' or an integer (0 = none)"
            )
        conv = functools.partial(Conv, dtype=self.dtype)
        depthwise = functools.partial(DepthwiseConv, impl=self.depthwise_impl, dtype=self.dtype)
        norm = batch_norm(train, epsilon=BN_EPS_TF, dtype=self.dtype, axis_name=self.bn_axis_name)

        plan = block_plan(self.variant)
        x = x.astype(self.dtype)
        x = conv(plan[0]["in_ch"], 3, 2, padding=self.stem_padding, name="conv_stem")(x)
        x = norm(name="bn1", act="silu", defer=True)(x)
        for idx, b in enumerate(plan):
            common = dict(
                out_ch=b["out_ch"],
                kernel=b["kernel"],
                stride=b["stride"],
                residual=b["residual"],
                drop_path=self.drop_path_rate * idx / len(plan),
                conv=conv,
                norm=norm,
                name=b["name"],
            )
            if b["block"] == "cn":
                x = ConvBnAct(**common)(x, train)
            elif b["block"] == "er":
                x = EdgeResidual(mid=b["mid"], **common)(x, train)
            else:
                x = InvertedResidual(mid=b["mid"], se=b["se"], depthwise=depthwise, **common)(
                    x, train
                )
        x = norm(name="bn2", act="silu")(conv(self.num_features, 1, name="conv_head")(x))
        x = jnp.mean(x, axis=(1, 2))
        if self.num_classes:
            x = nn.Dense(
                self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="classifier"
            )(x)
        return x
