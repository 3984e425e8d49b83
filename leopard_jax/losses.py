"""Training losses: CosFace with a per-sample margin function, ArcFace, triplet.

All functions are pure, jit/pmap friendly (static shapes; label -1 marks a padding
row, which is excluded by masks, never by boolean indexing) and have finite gradients
everywhere, including zero-norm embeddings and cos θ = ±1.

Each returns ``(loss, aux)``: a scalar mean over the valid rows (exactly 0 when there
are none) and a dict of diagnostics. ``aux["num_valid"]`` lets a data-parallel caller
weight per-device means.

`LOSSES` is the registry training reads by `config.loss.name` (and config validation
lists): a new loss is a function here and one entry there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

# Squared-norm floor for L2 normalisation: a zero vector maps to zero (cos = 0 with
# every centre) with a large but finite gradient instead of NaN.
_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / ||x||, with zero vectors mapped to zero (finite value and gradient)."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS))


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt with value 0 and gradient 0 at x <= 0 (plain sqrt has an infinite one)."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


# --- margin functions h(cos θ_y): the margin on the true class is m · h(cos θ_y) ----


def constant_margin(cos: jax.Array) -> jax.Array:
    """h ≡ 1: the original CosFace (Wang et al. 2018)."""
    return jnp.ones_like(cos)


def adaptive_margin(cos: jax.Array) -> jax.Array:
    """The paper's h = ((1 − cos²)⁴ + 0.1) / 1.1.

    Largest (1) for samples orthogonal to their centre (the hard ones), small for
    samples already aligned with it (so majority classes do not dominate) and for
    samples pointing away (likely bad or mislabelled images). A polynomial in cos, so
    no arccos and a smooth gradient at cos = ±1.
    """
    return (jnp.square(1.0 - jnp.square(cos)) ** 2 + 0.1) / 1.1


def spotid_code_margin(cos: jax.Array) -> jax.Array:
    """h = ((1 − cos²)·exp(1.3·cos − 1) + 0.1) / 0.629: what spotID's released code uses.

    Not the paper's function (its peak is near 60°, not 90°); here for comparisons.
    """
    return ((1.0 - jnp.square(cos)) * jnp.exp(1.3 * cos - 1.0) + 0.1) / 0.629


MARGIN_FUNCTIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = {
    "constant": constant_margin,
    "adaptive": adaptive_margin,
    "spotid_code": spotid_code_margin,
}

MarginFn = str | Callable[[jax.Array], jax.Array]


def _margin_function(margin_fn: MarginFn) -> Callable[[jax.Array], jax.Array]:
    if callable(margin_fn):
        return margin_fn
    try:
        return MARGIN_FUNCTIONS[margin_fn]
    except KeyError:
        raise ValueError(
            f"unknown margin_fn {margin_fn!r}; choose one of {sorted(MARGIN_FUNCTIONS)}"
            " or pass a function of cos θ"
        ) from None


# --- angular-margin softmax losses ---------------------------------------------------


def cosine_logits(embeddings: jax.Array, centers: jax.Array) -> jax.Array:
    """cos θ between every embedding [B, D] and every class centre [C, D] -> [B, C]."""
    return l2_normalize(embeddings) @ l2_normalize(centers).T


def _margin_softmax_loss(cos, labels, true_logit_fn, scale):
    """Softmax cross-entropy where the true class's cosine is replaced by true_logit_fn.

    Shared by CosFace and ArcFace: they differ only in how the margin bends cos θ_y.
    """
    num_classes = cos.shape[-1]
    valid = labels >= 0
    # one_hot of -1 is all zeros, so padding rows get no margin and are masked below.
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=cos.dtype)
    cos_true = jnp.sum(cos * one_hot, axis=-1)
    adjusted_true = true_logit_fn(cos_true)
    logits = scale * (cos + one_hot * (adjusted_true - cos_true)[:, None])
    per_example = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(logits * one_hot, axis=-1)
    num_valid = jnp.sum(valid)
    denom = jnp.maximum(num_valid, 1).astype(cos.dtype)
    loss = jnp.sum(jnp.where(valid, per_example, 0.0)) / denom
    correct = jnp.argmax(cos, axis=-1) == labels
    aux = {
        "logits": logits,
        "cos": cos,
        "cos_true": cos_true,
        "per_example": jnp.where(valid, per_example, 0.0),
        "accuracy": jnp.sum(correct & valid) / denom,
        "num_valid": num_valid,
    }
    return loss, aux


def cosface_loss(
    embeddings: jax.Array,
    centers: jax.Array,
    labels: jax.Array,
    *,
    scale: float = 64.0,
    margin: float = 0.28,
    margin_fn: MarginFn = "adaptive",
):
    """Large-margin cosine loss with the true-class logit s·(cos θ_y − m·h(cos θ_y)).

    Args:
      embeddings: [B, D]; L2-normalised here (zero rows are tolerated).
      centers: [C, D] class centres (the training-only classification layer),
        normalised here.
      labels: int [B] in [0, C), -1 for padding rows (labels >= C cannot be checked
        under jit: such a row gets no true-class logit).
      scale: s, the radius of the hypersphere the logits live on.
      margin: m.
      margin_fn: a name in MARGIN_FUNCTIONS or a function h(cos θ_y); "constant" is
        the original CosFace, "adaptive" the paper's.

    Returns:
      (mean loss over valid rows, aux) with aux["logits"] [B, C] (margin applied,
      scaled), aux["cos"] [B, C], aux["cos_true"] [B], aux["per_example"] [B],
      aux["accuracy"] (argmax of cos θ, no margin), aux["num_valid"].
    """
    h = _margin_function(margin_fn)
    return _margin_softmax_loss(
        cosine_logits(embeddings, centers), labels, lambda c: c - margin * h(c), scale
    )


def arcface_true_logit(cos: jax.Array, margin: float) -> jax.Array:
    """cos(θ + m), continued by cos θ − m·sin m once θ + m would pass π.

    Past θ = π − m, cos(θ + m) would start rising again (rewarding a worse angle), so
    the usual ArcFace treatment (as in insightface) switches to the CosFace-like line
    cos θ − m·sin m, which keeps the logit decreasing in θ (with a small downward step
    at θ = π − m).
    """
    cos = jnp.clip(cos, -1.0, 1.0)
    # (1 − cos)(1 + cos), not 1 − cos²: no cancellation for small angles.
    sin = _safe_sqrt((1.0 - cos) * (1.0 + cos))
    cos_m, sin_m = jnp.cos(margin), jnp.sin(margin)
    shifted = cos * cos_m - sin * sin_m
    threshold = jnp.cos(jnp.pi - margin)
    return jnp.where(cos > threshold, shifted, cos - margin * sin_m)


def arcface_loss(
    embeddings: jax.Array,
    centers: jax.Array,
    labels: jax.Array,
    *,
    scale: float = 64.0,
    margin: float = 0.5,
):
    """Additive angular margin loss (Deng et al. 2019): true logit s·cos(θ_y + m).

    Same arguments and aux as cosface_loss.
    """
    return _margin_softmax_loss(
        cosine_logits(embeddings, centers), labels, lambda c: arcface_true_logit(c, margin), scale
    )


# --- triplet loss with the paper's mining --------------------------------------------


def euclidean_distances(x: jax.Array) -> jax.Array:
    """Pairwise Euclidean distances [B, B] with finite gradients at d = 0."""
    sq = jnp.sum(jnp.square(x), axis=-1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    return _safe_sqrt(jnp.maximum(d2, 0.0))


def triplet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    margin: float = 0.2,
    semi_hard: bool | jax.Array = True,
    fallback_to_random: bool = False,
):
    """Triplet loss max(d(a,p) − d(a,n) + α, 0) over every positive pair in the batch.

    Every ordered pair (anchor a, positive p ≠ a) of the same label gets one negative:
    - semi_hard False (warm-up epochs): a uniformly random negative;
    - semi_hard True: a semi-hard one, d(a,p) < d(a,n) < d(a,p) + α, drawn with
      probability ∝ 1/d(a,n) (closer negatives are more informative). A pair with no
      semi-hard negative is skipped, or, with fallback_to_random (what the paper's
      text describes), gets a random negative.
    `semi_hard` may be a traced bool, so a warm-up switch does not recompile.
    Distances are Euclidean on the embeddings as given (no normalisation here).

    Args:
      embeddings: [B, D].
      labels: int [B], -1 for padding (never anchor, positive or negative).
      key: PRNG key for drawing the negatives.
      margin: α.

    Returns:
      (mean loss over the triplets used — exactly 0 when none is used, aux) with
      aux["num_triplets"], aux["num_pairs"] (positive pairs in the batch),
      aux["fraction_active"] (share of used triplets with a positive loss).
    """
    dist = euclidean_distances(embeddings)
    batch = labels.shape[0]
    valid = labels >= 0
    same = labels[:, None] == labels[None, :]
    both_valid = valid[:, None] & valid[None, :]
    positive = same & both_valid & ~jnp.eye(batch, dtype=bool)  # [a, p]
    negative = ~same & both_valid  # [a, n]

    # Mining works on [a, p, n]; selection carries no gradient (it is a choice).
    d = jax.lax.stop_gradient(dist)
    d_ap = d[:, :, None]
    d_an = d[:, None, :]
    negative_apn = jnp.broadcast_to(negative[:, None, :], (batch, batch, batch))
    semi_hard_apn = negative_apn & (d_an > d_ap) & (d_an < d_ap + margin)
    has_semi_hard = jnp.any(semi_hard_apn, axis=-1, keepdims=True)
    use_semi_hard = jnp.asarray(semi_hard, dtype=bool)
    if fallback_to_random:
        mined = jnp.where(has_semi_hard, semi_hard_apn, negative_apn)
    else:
        mined = semi_hard_apn
    candidates = jnp.where(use_semi_hard, mined, negative_apn)
    # Inverse-distance weights for semi-hard picks, uniform for random ones; sampled by
    # Gumbel-max so that one static-shape argmax draws every pair's negative at once.
    log_weight = jnp.where(use_semi_hard & semi_hard_apn, -jnp.log(jnp.maximum(d_an, 1e-12)), 0.0)
    gumbel = jax.random.gumbel(key, (batch, batch, batch), dtype=dist.dtype)
    scores = jnp.where(candidates, log_weight + gumbel, -jnp.inf)
    neg_index = jnp.argmax(scores, axis=-1)  # [a, p]
    used = positive & jnp.any(candidates, axis=-1)

    d_an_chosen = jnp.take_along_axis(dist, neg_index, axis=1)  # dist[a, neg[a, p]]
    per_triplet = jax.nn.relu(dist - d_an_chosen + margin)  # dist[a, p] = d(a, p)
    num_triplets = jnp.sum(used)
    denom = jnp.maximum(num_triplets, 1).astype(dist.dtype)
    loss = jnp.sum(jnp.where(used, per_triplet, 0.0)) / denom
    aux = {
        "num_triplets": num_triplets,
        "num_pairs": jnp.sum(positive),
        "fraction_active": jnp.sum(used & (per_triplet > 0)) / denom,
        "negative_index": jnp.where(used, neg_index, -1),
    }
    return loss, aux


# --- registry: the losses training can use, by config.loss.name ---------------------


@dataclasses.dataclass(frozen=True)
class Loss:
    """A training loss as the training step calls it.

    `fn(loss_config, embeddings, centers, labels, key, epoch) -> (mean loss, used)`, where
    `used` counts the samples (or triplets) the mean is over, so data-parallel devices can
    weight their means. `uses_centers`: it trains class centres (params["centers"]).
    `metric`: the distance held-out retrieval ranks by ("cosine" or "euclidean").
    """

    fn: Callable[..., tuple[jax.Array, jax.Array]]
    uses_centers: bool
    metric: str


def _cosface(c: Any, embeddings, centers, labels, key, epoch):
    del key, epoch
    loss, aux = cosface_loss(
        embeddings, centers, labels, scale=c.scale, margin=c.margin, margin_fn=c.margin_fn
    )
    return loss, aux["num_valid"]


def _arcface(c: Any, embeddings, centers, labels, key, epoch):
    del key, epoch
    loss, aux = arcface_loss(embeddings, centers, labels, scale=c.scale, margin=c.margin)
    return loss, aux["num_valid"]


def _triplet(c: Any, embeddings, centers, labels, key, epoch):
    """Random negatives for the warm-up epochs, then semi-hard mining (`epoch` may be traced)."""
    del centers
    semi_hard = epoch >= c.triplet_warmup_epochs
    loss, aux = triplet_loss(embeddings, labels, key, margin=c.triplet_margin, semi_hard=semi_hard)
    return loss, aux["num_triplets"]


LOSSES: Mapping[str, Loss] = {
    "cosface": Loss(_cosface, uses_centers=True, metric="cosine"),
    "arcface": Loss(_arcface, uses_centers=True, metric="cosine"),
    "triplet": Loss(_triplet, uses_centers=False, metric="euclidean"),
}
