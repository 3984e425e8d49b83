"""Held-out evaluation during training: retrieval metrics of the held-out individuals.

The images are embedded by the one embed path (`inference.embed_images`, the same that
`embed` and the bench use) straight from the loop's replicated state. Every process embeds
the whole held-out set (it is small), so all processes agree on the best model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from leopard_jax import inference, losses, metrics
from leopard_jax.models.embedding import EmbeddingModel
from leopard_jax.train.state import TrainState

REPORTED = ("DT5AP", "T1RMD", "T5RMD", "CCDR")


def evaluate(
    model: EmbeddingModel,
    rstate: TrainState,
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    config: ml_collections.ConfigDict,
) -> dict[str, float]:
    """{"test_DT5AP": ..., ...} for the held-out `images` (uint8 H×W×C) with `labels`,
    ranked by the loss's own distance (cosine for margin losses, Euclidean for triplet)."""
    variables = {"params": rstate.params["model"], "batch_stats": rstate.batch_stats}
    batch_size = config.eval.batch_size * jax.local_device_count()  # eval.batch_size per device
    embeddings = inference.embed_images(
        model, variables, images, batch_size=batch_size, replicated=True
    )
    result = metrics.retrieval_metrics(
        embeddings,
        labels,
        k_max=config.eval.k_max,
        metric=losses.LOSSES[config.loss.name].metric,
    )
    return {f"test_{k}": float(result[k]) for k in REPORTED}
