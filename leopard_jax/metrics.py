"""Open-set retrieval metrics of the paper, vectorised and chunked over queries.

Every sample is a query against all the others (leave-one-out). Definitions:

- rank: the other samples sorted by distance; equal distances are ranked by index
  (lower index first), so results are deterministic. Distances are float32: equal
  inputs (duplicate embeddings, equal dot products) give exactly equal distances, but
  distances that differ only in the last bit are not ties. Lists come from
  `ranking.best_k`, the top-k behind every ranked list in leopard_jax.
- DTkAP (Dynamic Top-k Average Precision): k_i = min(|C_i| − 1, k);
  DTkAP(i) = (1/k_i)·Σ_{j≤k_i} P(j), P(j) = (matches in the top j)/j. Queries whose
  class is a singleton (k_i = 0) are skipped; the metric is their mean.
- TkRMD (Top-k Rank Match Detection): share of queries, among those whose class has
  ≥ 2 samples, with at least one match in the top k.
- CCDR (Class Cosine Distance Ratio): per query, mean distance to its own class over
  mean distance to the other classes; averaged over queries having both.
- angular separation: mean angle (degrees) over all same-class pairs, over all
  different-class pairs, and the smallest angles over all pairs.

Angles are taken stably. arccos of a float32 cosine is off by up to ~0.03° near 0°
(cos θ ≈ 1 − θ²/2 rounds to 1 for θ < 0.02°), so for each query's 10 most similar others
the angle is recomputed from the unit vectors as 2·atan2(|â − b̂|, |â + b̂|), accurate to
~1e-5°: duplicates give exactly 0°. Every other pair keeps the arccos (accurate to ~1e-5°
for θ above 1°); only a query with more than 10 near-duplicates keeps the ~0.03° error
on the extra ones, in the means. The smallest angles come from the recomputed pairs.

Documented edge values: DTkAP and TkRMD are 0.0 when no query has a class-mate
(every class a singleton) — the worst score, so a best-model tracker never prefers
it; CCDR and the mean angles are NaN when undefined (e.g. one class only: there is
no inter-class distance), since 0 would read as a perfect score. "n_queries" says
how many queries counted.

The distance matrix is never held whole: each jitted step takes `chunk` queries
against all N samples (chunk × N floats): N = 20,000, D = 1024 peaks at ~1 GB of
host memory with the default chunk of 1024.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from leopard_jax import distances, ranking

NUM_SMALLEST_ANGLES = 10


def encode_labels(labels: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Any hashable labels (identity strings, ints) -> int32 class indices 0..C-1."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    _, encoded = np.unique(labels, return_inverse=True)
    return encoded.astype(np.int32).reshape(-1)


# --- ranking statistics, shared by the offline metrics and the in-batch DTkAP ---------


def precision_curves(matches: jax.Array, class_mates: jax.Array):
    """Per query: DTkAP and TkRMD curves for every cut-off k = 1..K.

    Args:
      matches: bool [Q, K], whether the j-th nearest other sample shares the class.
      class_mates: int [Q], |C_i| − 1.

    Returns:
      dtkap [Q, K] (column k−1 = DTkAP(i) with k_max = k; 0 where k_i = 0) and
      hit [Q, K] (column k−1 = a match within the top k).
    """
    num_k = matches.shape[-1]
    ranks = jnp.arange(1, num_k + 1, dtype=jnp.float32)
    precision = jnp.cumsum(matches.astype(jnp.float32), axis=-1) / ranks  # P(j)
    cum_precision = jnp.cumsum(precision, axis=-1)  # Σ_{j'≤j} P
    # DTkAP at cut-off k uses k_i = min(class_mates, k) ranks.
    k_i = jnp.minimum(class_mates[:, None], jnp.arange(1, num_k + 1)[None, :])
    summed = jnp.take_along_axis(cum_precision, jnp.maximum(k_i - 1, 0), axis=-1)
    dtkap = jnp.where(k_i > 0, summed / jnp.maximum(k_i, 1), 0.0)
    hit = jnp.cumsum(matches.astype(jnp.int32), axis=-1) > 0
    return dtkap, hit


def batch_dtkap(
    embeddings: jax.Array,
    labels: jax.Array,
    k: int = 5,
    mask: jax.Array | None = None,
    *,
    metric: str = "cosine",
) -> jax.Array:
    """DTkAP within one batch (jittable, static shapes): a cheap training signal.

    Class sizes are those within the batch; rows with label −1 or mask False are
    neither queries nor candidates. Returns the mean over queries with a class-mate
    in the batch, 0.0 when there is none.
    """
    distances.check_metric(metric)
    batch = labels.shape[0]
    valid = labels >= 0
    if mask is not None:
        valid = valid & mask.astype(bool)
    k = min(int(k), max(batch - 1, 1))
    dist, _ = distances.pairwise(embeddings, embeddings, metric)
    excluded = jnp.eye(batch, dtype=bool) | ~valid[None, :]
    _, idx = ranking.best_k(jnp.where(excluded, -jnp.inf, -dist), k)
    same = (labels[:, None] == labels[None, :]) & valid[None, :] & valid[:, None]
    class_mates = jnp.sum(same, axis=-1) - 1
    matches = jnp.take_along_axis(same, jnp.maximum(idx, 0), axis=-1) & (idx >= 0)
    dtkap, _ = precision_curves(matches, class_mates)
    counted = valid & (class_mates > 0)
    total = jnp.sum(jnp.where(counted, dtkap[:, -1], 0.0))
    return total / jnp.maximum(jnp.sum(counted), 1)


# --- chunked leave-one-out pass ------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("metric", "k_max", "num_near"))
def _query_chunk_stats(
    query_index, embeddings, unit, labels, class_mates, *, metric, k_max, num_near
):
    """Everything the offline metrics need from queries `query_index` [c] vs all N.

    `unit` is `embeddings` scaled to unit rows (once, so equal rows stay bit-equal).
    query_index entries ≥ N are padding of the last chunk (their outputs are ignored).
    """
    n = embeddings.shape[0]
    in_range = query_index < n
    q_index = jnp.minimum(query_index, n - 1)
    q_labels = labels[q_index]
    dist, cos = distances.pairwise(embeddings[q_index], embeddings, metric)
    column = jnp.arange(n)
    is_self = column[None, :] == q_index[:, None]
    same = (labels[None, :] == q_labels[:, None]) & ~is_self
    diff = labels[None, :] != q_labels[:, None]

    _, nn_index = ranking.best_k(jnp.where(is_self, -jnp.inf, -dist), k_max)
    matches = (labels[jnp.maximum(nn_index, 0)] == q_labels[:, None]) & (nn_index >= 0)
    dtkap, hit = precision_curves(matches, class_mates[q_index])

    # arccos for every pair; for the most similar ones the stable angle from the vectors.
    _, near = ranking.best_k(jnp.where(is_self, -jnp.inf, cos), num_near)
    near_angle = distances.angle_degrees(unit[q_index][:, None, :], unit[jnp.maximum(near, 0)])
    rows = jnp.arange(near.shape[0])[:, None]
    angle = (
        distances.arccos_degrees(cos)
        .at[rows, jnp.where(near >= 0, near, n)]
        .set(near_angle, mode="drop")
    )

    def masked_sum(values, where):
        return jnp.sum(jnp.where(where & in_range[:, None], values, 0.0), axis=-1)

    return {
        "dtkap": dtkap,
        "hit": hit,
        "same_dist": masked_sum(dist, same),
        "diff_dist": masked_sum(dist, diff),
        "same_count": jnp.sum(same, axis=-1),
        "diff_count": jnp.sum(diff, axis=-1),
        "same_angle": masked_sum(angle, same),
        "diff_angle": masked_sum(angle, diff),
        "near_index": near,
        "near_angle": near_angle,
    }


def _prepare(embeddings, labels):
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {embeddings.shape}")
    labels = encode_labels(labels)
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings but {labels.shape[0]} labels")
    if embeddings.shape[0] < 2:
        raise ValueError(f"need at least 2 embeddings to rank, got {embeddings.shape[0]}")
    if not np.all(np.isfinite(embeddings)):
        raise ValueError("embeddings contain NaN or inf; check the model or the input file")
    return embeddings, labels


def _leave_one_out_stats(embeddings, labels, *, metric, k_max, chunk):
    """Runs the chunked pass and gathers per-query arrays (numpy) and pooled sums."""
    distances.check_metric(metric)
    n = embeddings.shape[0]
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    k_max = min(int(k_max), n - 1)
    chunk = max(1, min(int(chunk), n))
    num_near = min(NUM_SMALLEST_ANGLES, n - 1)
    class_mates = np.bincount(labels)[labels] - 1
    emb = jnp.asarray(embeddings)
    unit = distances.unit_rows(emb)
    lab = jnp.asarray(labels)
    mates = jnp.asarray(class_mates)
    parts = []
    for start in range(0, n, chunk):
        index = jnp.arange(start, start + chunk, dtype=jnp.int32)
        parts.append(
            _query_chunk_stats(
                index, emb, unit, lab, mates, metric=metric, k_max=k_max, num_near=num_near
            )
        )
    parts = jax.device_get(parts)
    per_query = {key: np.concatenate([p[key] for p in parts])[:n] for key in parts[0]}
    pooled = {
        "same_angle": float(np.sum(per_query["same_angle"], dtype=np.float64)),
        "diff_angle": float(np.sum(per_query["diff_angle"], dtype=np.float64)),
        "smallest_angles": _smallest_angles(
            per_query["near_index"], per_query["near_angle"], num_near
        ),
    }
    return per_query, pooled, class_mates


def _smallest_angles(near_index: np.ndarray, near_angle: np.ndarray, count: int) -> np.ndarray:
    """The `count` smallest angles over distinct pairs, from each query's `count` most
    similar others: the globally closest pairs are among them, since a pair left out of a
    row's list has `count` closer pairs. A pair seen from both ends counts once."""
    n = near_index.shape[0]
    i = np.repeat(np.arange(n, dtype=np.int64), near_index.shape[1])
    j = near_index.reshape(-1).astype(np.int64)
    keep = j >= 0
    pair = np.minimum(i, j)[keep] * n + np.maximum(i, j)[keep]
    _, first = np.unique(pair, return_index=True)
    return np.sort(near_angle.reshape(-1)[keep][first])[:count]


def _rank_summary(per_query, class_mates):
    counted = class_mates > 0
    n_queries = int(np.sum(counted))
    if n_queries == 0:
        zeros = [0.0] * per_query["dtkap"].shape[1]
        return zeros, zeros, 0
    dtkap = per_query["dtkap"][counted].astype(np.float64).mean(axis=0)
    tkrmd = per_query["hit"][counted].astype(np.float64).mean(axis=0)
    return [float(v) for v in dtkap], [float(v) for v in tkrmd], n_queries


def _ccdr(per_query):
    """Mean over queries of (mean own-class distance) / (mean other-class distance).

    Distances are clamped at 0 (1 − cos of near-identical float32 vectors can be −1e-7), and
    a query whose other classes all sit at distance 0 has no ratio: with collapsed embeddings
    the result is NaN, not ±1e5 from rounding noise.
    """
    same_count, diff_count = per_query["same_count"], per_query["diff_count"]
    same = np.maximum(per_query["same_dist"].astype(np.float64), 0.0) / np.maximum(same_count, 1)
    diff = np.maximum(per_query["diff_dist"].astype(np.float64), 0.0) / np.maximum(diff_count, 1)
    ok = (same_count > 0) & (diff_count > 0) & (diff > 1e-6)
    if not np.any(ok):
        return float("nan")
    return float(np.mean(same[ok] / diff[ok]))


def _angles(per_query, pooled):
    same_pairs = int(np.sum(per_query["same_count"]))
    diff_pairs = int(np.sum(per_query["diff_count"]))
    nan = float("nan")
    return {
        "angle_same_mean": pooled["same_angle"] / same_pairs if same_pairs else nan,
        "angle_diff_mean": pooled["diff_angle"] / diff_pairs if diff_pairs else nan,
        "angles_smallest": [float(a) for a in pooled["smallest_angles"]],
    }


def retrieval_metrics(
    embeddings, labels, *, k_max: int = 10, metric: str = "cosine", chunk: int = 1024
) -> dict[str, Any]:
    """All the paper's metrics in one chunked leave-one-out pass.

    Args:
      embeddings: [N, D] array (numpy or jax).
      labels: [N] identities, any hashable values (strings are fine).
      k_max: largest cut-off; DTkAP and TkRMD are reported for every k = 1..k_max
        (capped at N − 1).
      metric: "cosine" (CosFace models) or "euclidean" (triplet models); angles are
        always from the cosine.
      chunk: queries per step; memory is about 6 · chunk · N · 4 bytes.

    Returns:
      plain Python values: "DTkAP" and "TkRMD" lists (index k−1), "DT{k}AP" and
      "T{k}RMD" keys for k in 1, 5, 10 where ≤ k_max, "CCDR", "n_queries" (queries
      with a class-mate), "n_samples", "n_classes", "angle_same_mean",
      "angle_diff_mean" (degrees), "angles_smallest" (the 10 smallest, ascending).
    """
    embeddings, labels = _prepare(embeddings, labels)
    per_query, pooled, class_mates = _leave_one_out_stats(
        embeddings, labels, metric=metric, k_max=k_max, chunk=chunk
    )
    dtkap_curve, tkrmd_curve, n_queries = _rank_summary(per_query, class_mates)
    result = {"DTkAP": dtkap_curve, "TkRMD": tkrmd_curve}
    for k in (1, 5, 10):
        if k <= len(dtkap_curve):
            result[f"DT{k}AP"] = dtkap_curve[k - 1]
            result[f"T{k}RMD"] = tkrmd_curve[k - 1]
    result.update(
        {
            "CCDR": _ccdr(per_query),
            "n_queries": n_queries,
            "n_samples": int(labels.shape[0]),
            "n_classes": int(labels.max()) + 1,
            "metric": metric,
            "k_max": len(dtkap_curve),
        }
    )
    result.update(_angles(per_query, pooled))
    return result


def per_query_metrics(
    embeddings, labels, *, k_max: int = 10, metric: str = "cosine", chunk: int = 1024
) -> dict[str, np.ndarray]:
    """Per-query scores, to find the hard queries or to check one by hand.

    Returns numpy arrays: "DTkAP" float [N, k_max] (column k−1: DTkAP(i) at cut-off k,
    0 for singletons), "match_in_top_k" bool [N, k_max], "class_mates" int [N]
    (|C_i| − 1; queries with 0 are left out of the means).
    """
    embeddings, labels = _prepare(embeddings, labels)
    per_query, _, class_mates = _leave_one_out_stats(
        embeddings, labels, metric=metric, k_max=k_max, chunk=chunk
    )
    return {
        "DTkAP": per_query["dtkap"],
        "match_in_top_k": per_query["hit"],
        "class_mates": class_mates,
    }


def paired_bootstrap(
    scores_a, scores_b, groups, *, samples: int = 10_000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """How sure is "a beats b"? The mean per-query difference a − b with a percentile
    interval, resampling whole groups (individuals) with replacement.

    Why groups, not queries: a held-out individual's photos are one another's class-mates
    and confusers, so its queries rise and fall together; with a few dozen held-out animals
    the individual is the unit that varies. Each resample's mean weights the queries
    equally, as DTkAP's own mean does.

    Returns "diff" (on the data as given), "low"/"high" (the `level` interval),
    "p_not_better" (share of resamples with a − b ≤ 0) and "groups".
    """
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(groups) != a.shape[0]:
        raise ValueError(
            "need two score vectors and one group per query; "
            f"got {a.shape}, {b.shape}, {len(groups)}"
        )
    if a.size == 0:
        raise ValueError("no queries to compare")
    _, group_of = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(group_of.max()) + 1
    diff_sum = np.bincount(group_of, weights=a - b, minlength=n_groups)
    count = np.bincount(group_of, minlength=n_groups).astype(np.float64)
    # how often each group is drawn in each resample of n_groups draws with replacement
    times = np.random.default_rng(seed).multinomial(
        n_groups, np.full(n_groups, 1.0 / n_groups), size=samples
    )
    means = (times @ diff_sum) / (times @ count)
    tail = (1.0 - level) / 2
    return {
        "diff": float(diff_sum.sum() / count.sum()),
        "low": float(np.quantile(means, tail)),
        "high": float(np.quantile(means, 1.0 - tail)),
        "p_not_better": float(np.mean(means <= 0.0)),
        "groups": n_groups,
    }


# --- single metrics (same pass; convenient when only one number is wanted) ------------


def dtkap(embeddings, labels, *, k: int = 5, metric: str = "cosine", chunk: int = 1024) -> float:
    """Mean DTkAP with k_max = k (0.0 when no query has a class-mate)."""
    return retrieval_metrics(embeddings, labels, k_max=k, metric=metric, chunk=chunk)["DTkAP"][-1]


def tkrmd(
    embeddings, labels, *, k_max: int = 10, metric: str = "cosine", chunk: int = 1024
) -> list[float]:
    """TkRMD for k = 1..k_max (all 0.0 when no query has a class-mate)."""
    return retrieval_metrics(embeddings, labels, k_max=k_max, metric=metric, chunk=chunk)["TkRMD"]


def ccdr(embeddings, labels, *, metric: str = "cosine", chunk: int = 1024) -> float:
    """Mean per-query intra/inter distance ratio (NaN when no query has both)."""
    return retrieval_metrics(embeddings, labels, k_max=1, metric=metric, chunk=chunk)["CCDR"]


def angular_separation(embeddings, labels, *, chunk: int = 1024) -> dict[str, Any]:
    """Mean same-class and different-class angle (degrees), the 10 smallest angles."""
    result = retrieval_metrics(embeddings, labels, k_max=1, chunk=chunk)
    return {key: result[key] for key in ("angle_same_mean", "angle_diff_mean", "angles_smallest")}
