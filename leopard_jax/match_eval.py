"""Scores of a re-ranked match CSV (`python -m leopard_jax.match --rerank local`), for
`python -m leopard_jax.evaluate --matches`: the deep, local and fused rankings side by side
(DTkAP/TkRMD, calibration error), and how well each query's best probability tells a known
individual from a new one (AUROC, with an interval that resamples individuals).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np

from leopard_jax import cli, embeddings_io, evaluate

RANKINGS = ("deep", "local", "fused")


def read_matches(path) -> dict[str, list[dict[str, str]]]:
    """Rows of a re-ranked match CSV grouped by query key, in the CSV's (fused) order."""
    import csv

    from leopard_jax import match

    path = pathlib.Path(path)
    if not path.is_file():
        raise cli.CommandError(
            f"{path}: not found; write it with `python -m leopard_jax.match --rerank local "
            f"--out {path}`"
        )
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in match.RERANK_FIELDS if c not in (reader.fieldnames or [])]
        if missing:
            raise cli.CommandError(
                f"{path}: lacks {', '.join(missing)}; write it with "
                "`python -m leopard_jax.match --rerank local`"
            )
        by_query: dict[str, list[dict[str, str]]] = {}
        for row in reader:
            by_query.setdefault(row["query_key"], []).append(row)
    for rows in by_query.values():
        rows.sort(key=lambda r: int(r["rank"]))
    return by_query


def _class_of(identity: str, flank: str, by_flank: bool) -> str:
    return f"{identity}/{flank}" if by_flank and identity and flank else identity


def auroc(scores, positive) -> float:
    """Area under the ROC curve (ties count half); NaN without both classes."""
    return auroc_weighted(scores, positive, np.ones((1, len(positive))))[0]


def auroc_weighted(scores, positive, weights) -> np.ndarray:
    """AUROC per row of `weights` [S, n] (a resample's count of each query)."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return np.full(len(weights), np.nan)
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    w_pos, w_neg = weights[:, positive], weights[:, ~positive]
    total = w_pos.sum(1) * w_neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("sp,pn,sn->s", w_pos, wins, w_neg) / total


def auroc_interval(scores, positive, groups, *, samples=2000, level=0.95, seed=0):
    """AUROC with a percentile interval resampling whole groups (individuals)."""
    _, group_of = np.unique(np.asarray(groups), return_inverse=True)
    n = int(group_of.max()) + 1
    times = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=samples)
    values = auroc_weighted(scores, positive, times[:, group_of].astype(np.float64))
    values = values[np.isfinite(values)]
    tail = (1 - level) / 2
    return {
        "auroc": float(auroc(scores, positive)),
        "low": float(np.quantile(values, tail)) if len(values) else float("nan"),
        "high": float(np.quantile(values, 1 - tail)) if len(values) else float("nan"),
    }


def evaluate_matches(
    data: embeddings_io.Embeddings, by_query, *, k_max: int = 10, by_flank: bool = True
) -> dict[str, Any]:
    """Deep, local and fused rankings of a re-ranked match CSV scored side by side; the
    gallery (`data`, the embeddings the CSV was matched against) gives class sizes."""
    from leopard_jax import metrics
    from leopard_jax.local import calibration

    gallery_class = evaluate.class_labels(data, by_flank=by_flank)
    class_size = dict(zip(*np.unique(gallery_class[gallery_class != ""], return_counts=True)))
    gallery_keys = set(data.keys.tolist())
    queries, mates, groups = [], [], []
    matches = {name: np.zeros((len(by_query), k_max), bool) for name in RANKINGS}
    best = {name: np.zeros(len(by_query)) for name in RANKINGS}
    pair_p = {name: [] for name in RANKINGS}
    pair_same = []
    for i, (key, rows) in enumerate(by_query.items()):
        q_class = _class_of(rows[0]["query_identity"], rows[0]["query_flank"], by_flank)
        if not q_class:
            continue
        queries.append(i)
        groups.append(rows[0]["query_identity"])
        mates.append(int(class_size.get(q_class, 0)) - (key in gallery_keys))
        same = np.array(
            [_class_of(r["match_identity"], r["match_flank"], by_flank) == q_class for r in rows]
        )
        deep_rank = np.array([int(r["deep_rank"]) for r in rows])
        # the local score (expanded); a CSV written before it existed has the inliers only
        local = np.array([float(r.get("local_score") or r["local_inliers"]) for r in rows])
        order = {
            "fused": np.arange(len(rows)),
            "deep": np.argsort(deep_rank, kind="stable"),
            "local": np.lexsort((deep_rank, -local)),
        }
        for name in RANKINGS:
            hits = same[order[name]][:k_max]
            matches[name][i, : len(hits)] = hits
            p = np.array([float(r[f"p_{name}"]) for r in rows])
            best[name][i] = p.max(initial=0.0)
            pair_p[name].extend(p.tolist())
        pair_same.extend(same.tolist())
    if not queries:
        raise ValueError("no labelled query in the match CSV; evaluation needs identities")
    queries, mates, groups = np.array(queries), np.array(mates), np.array(groups)
    counted = mates > 0
    result: dict[str, Any] = {
        "n_queries": int(len(queries)),
        "n_known": int(counted.sum()),
        "n_new": int((~counted).sum()),
    }
    per_query = {}
    for name in RANKINGS:
        dtkap, hit = metrics.precision_curves(matches[name][queries], mates)
        dtkap, hit = np.asarray(dtkap), np.asarray(hit)
        per_query[name] = dtkap[:, min(5, k_max) - 1]
        curves = {
            "DTkAP": dtkap[counted].mean(0).tolist() if counted.any() else [0.0] * k_max,
            "TkRMD": hit[counted].mean(0).tolist() if counted.any() else [0.0] * k_max,
        }
        entry = {
            **curves,
            **{k: v for k, v in evaluate.extend_curves(curves, k_max).items() if k not in curves},
        }
        entry["ece"] = calibration.ece(pair_p[name], pair_same)
        if counted.any() and (~counted).any():
            entry["auroc"] = auroc_interval(best[name][queries], counted, groups)
        result[name] = entry
    if counted.any():
        for other in ("deep", "local"):
            result[f"fused_minus_{other}_DT5AP"] = metrics.paired_bootstrap(
                per_query["fused"][counted], per_query[other][counted], groups[counted]
            )
    return result


def format_matches_table(result: dict[str, Any]) -> str:
    def num(v):
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"

    lines = [
        f"{result['n_queries']} queries: {result['n_known']} known, {result['n_new']} new",
        f"{'':8}{'DT5AP':>8}{'T1RMD':>8}{'T5RMD':>8}{'ECE':>8}  AUROC known/new [95 %]",
    ]
    for name in RANKINGS:
        r = result[name]
        a = r.get("auroc")
        auc = f"{num(a['auroc'])} [{num(a['low'])}, {num(a['high'])}]" if a else "n/a"
        lines.append(
            f"{name:8}{num(r.get('DT5AP')):>8}{num(r.get('T1RMD')):>8}"
            f"{num(r.get('T5RMD')):>8}{num(r['ece']):>8}  {auc}"
        )
    for other in ("deep", "local"):
        b = result.get(f"fused_minus_{other}_DT5AP")
        if b:
            lines.append(
                f"fused - {other} DT5AP {b['diff']:+.3f} [{b['low']:+.3f}, {b['high']:+.3f}]"
            )
    return "\n".join(lines)
