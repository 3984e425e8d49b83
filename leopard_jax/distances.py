"""Distances and angles between embeddings: the formulas the metrics and the tests share.

Distances are float32 and follow the matmul (fast, and equal inputs give bit-equal
distances, so ties stay ties). Angles are the exception where float32 cancellation
shows: arccos of a cosine that rounds to 1 is off by up to ~0.03° near 0°, so angles
that must be exact near 0° (and 180°) use `angle_degrees`, from the vectors themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

METRICS = ("cosine", "euclidean")
_NORM_EPS = 1e-12


def inv_norms(x: jax.Array) -> jax.Array:
    """1 / |row|, with zero rows kept finite (they get cosine 0 with everything)."""
    return jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1), _NORM_EPS))


def pairwise(q, x, metric):
    """(distance [Q, N], cosine [Q, N]) between rows of q and rows of x.

    Cosine is the raw dot product scaled by both inverse norms (not a dot of
    normalised vectors), so equal raw dot products give bit-equal distances and ties
    stay ties. Zero vectors have cosine 0 with everything.
    """
    # HIGHEST: no TF32 / bf16 passes on accelerators, so exact ties stay ties there too.
    dot = jnp.dot(q, x.T, precision=jax.lax.Precision.HIGHEST)
    cos = dot * inv_norms(q)[:, None] * inv_norms(x)[None, :]
    if metric == "cosine":
        dist = 1.0 - cos
    else:
        sq_q = jnp.sum(jnp.square(q), axis=-1)
        sq_x = jnp.sum(jnp.square(x), axis=-1)
        dist = jnp.sqrt(jnp.maximum(sq_q[:, None] + sq_x[None, :] - 2.0 * dot, 0.0))
    return dist, cos


def distance_matrix(x, y=None, *, metric: str = "cosine") -> np.ndarray:
    """Distances [N, M] between rows of x and rows of y (default y = x), as numpy.

    cosine: 1 − cos θ (in [0, 2]); euclidean: ||x − y||. Holds the whole matrix:
    for large N use retrieval_metrics or ranking.top_k, which work in chunks.
    """
    check_metric(metric)
    x = jnp.asarray(x, jnp.float32)
    y = x if y is None else jnp.asarray(y, jnp.float32)
    return np.asarray(_PAIRWISE(x, y, metric)[0])


_PAIRWISE = jax.jit(pairwise, static_argnums=2)


def check_metric(metric):
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


# Abramowitz & Stegun 4.4.46: arccos x = sqrt(1 − x)·Σ a_i x^i on [0, 1], |error| ≤ 2e-8.
_ACOS_COEFFS = (
    1.5707963050,
    -0.2145988016,
    0.0889789874,
    -0.0501743046,
    0.0308918810,
    -0.0170881256,
    0.0066700901,
    -0.0012624911,
)


def arccos_degrees(cos: jax.Array) -> jax.Array:
    """arccos in degrees by a polynomial: as accurate as float32 arccos, ~20× faster.

    The angle statistics take an arccos of every pair (N² of them); XLA's arccos on
    CPU cost as much as the distance matmul itself.
    """
    x = jnp.abs(jnp.clip(cos, -1.0, 1.0))
    poly = jnp.full_like(x, _ACOS_COEFFS[-1])
    for coeff in _ACOS_COEFFS[-2::-1]:
        poly = poly * x + coeff
    radians = jnp.sqrt(1.0 - x) * poly
    radians = jnp.where(cos < 0, jnp.pi - radians, radians)
    return radians * (180.0 / jnp.pi)


@jax.jit
def unit_rows(x: jax.Array) -> jax.Array:
    """Rows scaled to unit norm; zero rows stay zero."""
    return x * inv_norms(x)[:, None]


def angle_degrees(a: jax.Array, b: jax.Array) -> jax.Array:
    """Angle (degrees) between unit (or zero) vectors a [..., D] and b [..., D], stable
    at 0° and 180°: 2·atan2(|a − b|, |a + b|) (Kahan). Bit-equal vectors give exactly 0;
    a zero vector is at 90° from everything, as its cosine 0 says."""
    apart = jnp.linalg.norm(a - b, axis=-1)
    along = jnp.linalg.norm(a + b, axis=-1)
    radians = 2.0 * jnp.arctan2(apart, along)
    both_zero = (apart == 0) & (along == 0)
    return jnp.where(both_zero, 90.0, radians * (180.0 / jnp.pi))
