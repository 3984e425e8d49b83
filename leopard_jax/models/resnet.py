"""ResNet-18, layer for layer timm's `resnet18` (the paper's comparison backbone).

Names follow timm's state-dict keys with `.<index>` written `_<index>` (`layer2.0.downsample.0`
is `layer2_0/downsample_0`), so `convert.py` maps weights by name alone. `conv` and `norm`
are set once in `ResNet18` and handed to the blocks, as in flax's imagenet example.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from leopard_jax.models.layers import BN_EPS_TORCH, Conv, DropPath, ModuleDef, batch_norm

WIDTHS = (64, 128, 256, 512)
DEPTHS = (2, 2, 2, 2)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers around a (1x1 conv-BN when shapes change) shortcut."""

    out_ch: int
    stride: int
    drop_path: float
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool):
        y = self.conv(self.out_ch, 3, self.stride, padding=1, name="conv1")(x)
        y = self.norm(name="bn1", act="relu")(y)
        y = self.norm(name="bn2")(self.conv(self.out_ch, 3, 1, padding=1, name="conv2")(y))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.out_ch:
            shortcut = self.conv(self.out_ch, 1, self.stride, padding=0, name="downsample_0")(x)
            shortcut = self.norm(name="downsample_1")(shortcut)
        return nn.relu(DropPath(self.drop_path)(y, train) + shortcut)


class ResNet18(nn.Module):
    """7x7/2 stem, 3x3/2 max-pool, four stages of two BasicBlocks, global average pool.

    `num_classes=0` returns the pooled 512 features. Stochastic depth grows linearly from 0
    at the first block to `drop_path_rate` at the last, as timm does.
    """

    num_classes: int = 1000
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None  # pmap axis for global-batch statistics

    @property
    def num_features(self) -> int:
        return WIDTHS[-1]

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(Conv, dtype=self.dtype)
        norm = batch_norm(
            train, epsilon=BN_EPS_TORCH, dtype=self.dtype, axis_name=self.bn_axis_name
        )

        x = x.astype(self.dtype)
        x = norm(name="bn1", act="relu")(conv(64, 7, 2, padding=3, name="conv1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        total, idx = sum(DEPTHS), 0
        for s, (width, depth) in enumerate(zip(WIDTHS, DEPTHS)):
            for i in range(depth):
                stride = 2 if (s > 0 and i == 0) else 1
                x = BasicBlock(
                    width,
                    stride,
                    self.drop_path_rate * idx / (total - 1),
                    conv=conv,
                    norm=norm,
                    name=f"layer{s + 1}_{i}",
                )(x, train)
                idx += 1
        x = jnp.mean(x, axis=(1, 2))
        if self.num_classes:
            x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(x)
        return x
