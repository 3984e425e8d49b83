"""Held-out evaluation during training: retrieval metrics of the held-out individuals.

The images are embedded by the one embed path (`inference.embed_images`, the same that
`embed` and the bench use) straight from the loop's replicated state. Every process embeds
the whole held-out set (it is small), so all processes agree on the best model. The set is
sent to the devices once (`held_out_images`) when it fits in `config.eval.cache_mb` per
device: re-reading and re-sending it every epoch was most of an epoch boundary on an H200
(820 images, 420 MB, ~0.6 s against a 2 s epoch).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from leopard_jax import inference, losses, metrics
from leopard_jax.data import records
from leopard_jax.models.embedding import EmbeddingModel
from leopard_jax.train.state import TrainState

REPORTED = ("DT5AP", "T1RMD", "T5RMD", "CCDR")


def batch_size(config: ml_collections.ConfigDict) -> int:
    return config.eval.batch_size * jax.local_device_count()  # eval.batch_size per device


def held_out_images(
    images: records.RecordSource, config: ml_collections.ConfigDict
) -> records.RecordSource | inference.DeviceBatches:
    """`images` on the devices, read once, when they fit in `config.eval.cache_mb` per
    device; else `images`, read from disk at every evaluation."""
    per_device = len(images) * int(np.prod(images.shape)) / jax.local_device_count()
    if per_device > config.eval.cache_mb * 2**20:
        return images
    return inference.to_devices(images, batch_size=batch_size(config))


def evaluate(
    model: EmbeddingModel,
    rstate: TrainState,
    images: Sequence[np.ndarray] | inference.DeviceBatches,
    labels: np.ndarray,
    config: ml_collections.ConfigDict,
) -> dict[str, float]:
    """{"test_DT5AP": ..., ...} for the held-out `images` (uint8 H×W×C, or on the devices:
    `held_out_images`) with `labels`, ranked by the loss's own distance (cosine for margin
    losses, Euclidean for triplet)."""
    variables = {"params": rstate.params["model"], "batch_stats": rstate.batch_stats}
    embeddings = inference.embed_images(
        model, variables, images, batch_size=batch_size(config), replicated=True
    )
    result = metrics.retrieval_metrics(
        embeddings,
        labels,
        k_max=config.eval.k_max,
        metric=losses.LOSSES[config.loss.name].metric,
    )
    return {f"test_{k}": float(result[k]) for k in REPORTED}
