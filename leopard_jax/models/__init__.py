"""Backbones (timm-exact EfficientNetV2 B0-B3, ResNet-18) and the embedding model.

The registries config validation and the commands read: `BACKBONES` (name -> constructor),
`DTYPES` (compute dtype name -> dtype; parameters stay float32) and `embedding.HEADS`.
`build_backbone(name)` is the one place names map to modules; `convert.py` and
`embedding.py` go through it, so a new backbone is one entry in `BACKBONES`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from leopard_jax.models.efficientnet_v2 import VARIANTS, EfficientNetV2
from leopard_jax.models.resnet import ResNet18

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **{f"efficientnetv2_{v}": functools.partial(EfficientNetV2, variant=v) for v in VARIANTS},
    "resnet18": ResNet18,
}

# compute dtype names (config.model.dtype, embed --dtype); parameters stay float32
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def canonical_name(name: str) -> str:
    """Our name for a backbone; accepts timm's `tf_efficientnetv2_bN` as well."""
    key = name.lower().removeprefix("tf_")
    if key not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)} "
            "(timm names tf_efficientnetv2_b0..b3 are accepted too)"
        )
    return key


def build_backbone(
    name: str,
    /,
    *,
    num_classes: int = 1000,
    drop_path_rate: float = 0.0,
    dtype: Any = jnp.float32,
    **kwargs,
) -> nn.Module:
    """A linen backbone: `__call__(x [B,H,W,C], train)` -> logits, or pooled features when
    `num_classes=0`; `.num_features` is the pooled width. Extra kwargs go to the module
    (the flax `name`; `depthwise_impl`, `stem_padding` for EfficientNetV2)."""
    return BACKBONES[canonical_name(name)](
        num_classes=num_classes, drop_path_rate=drop_path_rate, dtype=dtype, **kwargs
    )


__all__ = ["BACKBONES", "DTYPES", "build_backbone", "canonical_name", "EfficientNetV2", "ResNet18"]
