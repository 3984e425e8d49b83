"""Backbone -> head -> Dense(dims) -> L2-normalise: the model that training, `embed` and
imported spotID checkpoints all share.

Heads: `pooled` feeds the pooled backbone features to the projection (the default: no
1000-way ImageNet bottleneck); `spotid` feeds the backbone's 1000 class logits, as the
original spotID `EmbeddingNetwork` does, so its checkpoints import unchanged.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from leopard_jax.models import build_backbone

SPOTID_CLASSES = 1000
# head name -> the backbone classifier width the projection sits on (0: pooled features)
HEADS: dict[str, int] = {"pooled": 0, "spotid": SPOTID_CLASSES}


def l2_normalize(x, eps: float = 1e-12):
    """x / max(||x||, eps), as torch's F.normalize; float32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class EmbeddingModel(nn.Module):
    """Images [B, H, W, C] -> float32 unit-norm embeddings [B, dims].

    Params: {"backbone": ..., "embedding": {"kernel", "bias"}}. With `dtype=bfloat16` the
    network computes in bf16 on fp32 parameters; the projection output is normalised in fp32.
    """

    backbone: str = "efficientnetv2_b2"
    head: str = "pooled"
    dims: int = 1024
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    in_chans: int | None = None  # recorded in model.json for readers; the input decides
    # None: the backbone's own stem; 0 for spotID's multi-channel imports (see convert.py)
    stem_padding: str | int | None = None
    bn_axis_name: str | None = None  # pmap axis: batch statistics over the global batch

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose one of {tuple(HEADS)}")
        stem = {} if self.stem_padding is None else {"stem_padding": self.stem_padding}
        backbone = build_backbone(
            self.backbone,
            num_classes=HEADS[self.head],
            drop_path_rate=self.drop_path_rate,
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            name="backbone",
            **stem,
        )
        projection = nn.Dense(
            self.dims, dtype=self.dtype, param_dtype=jnp.float32, name="embedding"
        )
        return l2_normalize(projection(backbone(x, train)))
