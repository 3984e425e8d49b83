"""Top-k ranking: the one place that orders gallery rows for a query.

Every ranked list in leopard_jax comes from here: the match CSV (`match`), the review
page's candidates (`review.candidates`) and the nearest neighbours behind DTkAP / TkRMD
(`metrics`, inside its jitted chunks through `best_k`). The rules, shared by all:

- higher score first; equal scores go to the lower gallery index, so results are
  deterministic and match a plain sort by (−score, index);
- excluded pairs (a query against itself, an already decided candidate) are never
  returned; a slot with nothing left to fill holds index −1 and score −inf.

`top_k` is chunked over queries and gallery: it holds one query block × gallery block of
scores at a time plus the running best k, whatever the gallery size.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# exclude(query_rows [q], gallery_rows [g]) -> bool [q, g]: True where a pair must not rank.
Exclude = Callable[[np.ndarray, np.ndarray], np.ndarray]


def best_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(scores [..., k], column indices [..., k]) of the k highest scores per row (jittable).

    −inf marks an excluded entry: it comes back as index −1. Ties go to the lower column
    (lax.top_k keeps the lower index first among equal values); −0.0 is folded into +0.0
    so that the two zeros tie too.
    """
    scores = scores + 0.0
    missing = k - scores.shape[-1]
    if missing > 0:
        pad = jnp.full((*scores.shape[:-1], missing), -jnp.inf, scores.dtype)
        scores = jnp.concatenate([scores, pad], axis=-1)
    top, index = jax.lax.top_k(scores, k)
    return top, jnp.where(jnp.isneginf(top), -1, index)


def same_row(query_rows: np.ndarray, gallery_rows: np.ndarray) -> np.ndarray:
    """Exclusion for a set ranked against itself: a row never matches itself."""
    return query_rows[:, None] == gallery_rows[None, :]


def top_k(
    queries,
    gallery,
    k: int,
    *,
    exclude: Exclude | None = None,
    query_block: int = 1024,
    gallery_block: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """The k gallery rows with the highest dot product with each query (cosine similarity
    for unit-norm embeddings).

    Args:
      queries: [Q, D] float array.
      gallery: [G, D] float array.
      k: list length; fewer candidates than k leave −1 slots.
      exclude: pairs that must not rank (see `Exclude`), e.g. `same_row`.
      query_block, gallery_block: block sizes; memory is about
        3 · query_block · (gallery_block + k) · 4 bytes.

    Returns:
      (indices int64 [Q, k] into the gallery, −1 for an empty slot;
       scores float32 [Q, k], −inf for an empty slot), best first.
    """
    queries = _as_matrix(queries, "queries")
    gallery = _as_matrix(gallery, "gallery")
    if len(queries) and len(gallery) and queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries are {queries.shape[1]}-d, gallery rows {gallery.shape[1]}-d")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    n_q, n_g = len(queries), len(gallery)
    indices = np.full((n_q, k), -1, np.int64)
    scores = np.full((n_q, k), -np.inf, np.float32)
    if n_q == 0 or n_g == 0:
        return indices, scores
    q_size, g_size = max(1, min(query_block, n_q)), max(1, min(gallery_block, n_g))
    for q0 in range(0, n_q, q_size):
        q_rows = np.arange(q0, min(q0 + q_size, n_q))
        q = jnp.asarray(_pad_rows(queries[q_rows], q_size))
        best = jnp.full((q_size, k), -jnp.inf, jnp.float32)
        best_index = jnp.full((q_size, k), -1, jnp.int32)
        for g0 in range(0, n_g, g_size):
            g_rows = np.arange(g0, min(g0 + g_size, n_g))
            allowed = np.zeros((q_size, g_size), bool)
            allowed[: len(q_rows), : len(g_rows)] = True
            if exclude is not None:
                allowed[: len(q_rows), : len(g_rows)] &= ~np.asarray(exclude(q_rows, g_rows), bool)
            g = jnp.asarray(_pad_rows(gallery[g_rows], g_size))
            best, best_index = _merge_block(best, best_index, q, g, allowed, g0)
        indices[q_rows] = np.asarray(best_index)[: len(q_rows)]
        scores[q_rows] = np.asarray(best)[: len(q_rows)]
    return indices, scores


@jax.jit
def _merge_block(best, best_index, q, g, allowed, g0):
    """The running best k merged with one gallery block. The running list holds only
    lower gallery indices than the block and sits before it, so `best_k`'s tie rule
    (lower column first) keeps ties in gallery-index order across blocks."""
    block = jnp.dot(q, g.T, precision=jax.lax.Precision.HIGHEST)
    block = jnp.where(allowed, block, -jnp.inf)
    block_index = g0 + jnp.arange(g.shape[0], dtype=jnp.int32)
    candidates = jnp.concatenate([best, block], axis=1)
    candidate_index = jnp.concatenate(
        [best_index, jnp.broadcast_to(block_index, block.shape)], axis=1
    )
    top, column = best_k(candidates, best.shape[1])
    index = jnp.take_along_axis(candidate_index, jnp.maximum(column, 0), axis=1)
    return top, jnp.where(column < 0, -1, index)


def _as_matrix(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {x.shape}")
    return x


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Zero rows up to `rows`, so every block has one shape and compiles once."""
    return (
        x if len(x) == rows else np.concatenate([x, np.zeros((rows - len(x), x.shape[1]), x.dtype)])
    )
