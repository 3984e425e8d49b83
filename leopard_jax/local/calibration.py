"""Scores -> P(same individual), and their fusion (WildFusion-style).

Each score (deep cosine similarity, local verified inliers) is mapped to a probability by
a logistic calibrator (Platt scaling) fitted on labelled pairs; the fused probability is a
logistic regression on the two calibrated log-odds, so it is calibrated too and learns how
much to trust each. Calibrators must be fitted on individuals other than those they score
(`cross_fit` does this by individual when there is one labelled set).

The calibrator is saved as a small JSON beside the model, tagged with the model's
fingerprint: the deep score's meaning changes with the weights, so another model's
calibrator is refused.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

FILE_NAME = "calibrator.json"
NEW_INDIVIDUAL_THRESHOLD = 0.5
_L2 = 1.0  # a weak prior on the slopes: finite weights when scores separate perfectly


class CalibratorError(ValueError):
    """An unusable calibrator file; the message says why and how to make a fitting one."""


def features(deep: np.ndarray, inliers: np.ndarray) -> dict[str, np.ndarray]:
    """The calibrators' inputs: cosine as is, inliers on a log scale (10 vs 20 inliers
    matter more than 110 vs 120)."""
    return {
        "deep": np.asarray(deep, np.float64)[:, None],
        "local": np.log1p(np.maximum(np.asarray(inliers, np.float64), 0))[:, None],
    }


def fit_logistic(x: np.ndarray, y: np.ndarray, *, steps: int = 50) -> np.ndarray:
    """Weights [d + 1] (last: bias) of an L2-regularised logistic regression (Newton)."""
    x = np.concatenate([np.asarray(x, np.float64), np.ones((len(x), 1))], axis=1)
    y = np.asarray(y, np.float64)
    w = np.zeros(x.shape[1])
    if len(np.unique(y)) < 2:
        raise CalibratorError(
            "calibration needs pairs of the same and of different individuals; "
            f"all {len(y)} labelled pairs are {'same' if len(y) and y[0] else 'different'}"
        )
    reg = _L2 * np.eye(len(w))
    reg[-1, -1] = 0.0
    for _ in range(steps):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - y) + reg @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + reg + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def _logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fit(deep, inliers, same, *, model_fingerprint: str = "") -> dict[str, Any]:
    """A calibrator (JSON-ready dict) from labelled pairs: scores and same-individual flags."""
    x, same = features(deep, inliers), np.asarray(same, bool)
    weights = {name: fit_logistic(x[name], same) for name in ("deep", "local")}
    logits = np.stack([_logit(_apply(weights[n], x[n])) for n in ("deep", "local")], axis=1)
    weights["fused"] = fit_logistic(logits, same)
    return {
        "model_fingerprint": model_fingerprint,
        "weights": {n: w.tolist() for n, w in weights.items()},
        "pairs": int(len(same)),
        "same_pairs": int(same.sum()),
        "new_individual_threshold": NEW_INDIVIDUAL_THRESHOLD,
    }


def _apply(w, x) -> np.ndarray:
    w = np.asarray(w, np.float64)
    return _sigmoid(x @ w[:-1] + w[-1])


def probabilities(calibrator: dict[str, Any], deep, inliers) -> dict[str, np.ndarray]:
    """P(same individual) per pair from each score and fused: {"deep", "local", "fused"}."""
    x, w = features(deep, inliers), calibrator["weights"]
    out = {n: _apply(w[n], x[n]) for n in ("deep", "local")}
    logits = np.stack([_logit(out["deep"]), _logit(out["local"])], axis=1)
    out["fused"] = _apply(w["fused"], logits)
    return out


def cross_fit(
    deep, inliers, same, groups, *, candidate_groups=None, folds: int = 5, model_fingerprint=""
) -> dict[str, np.ndarray]:
    """Out-of-fold probabilities: individuals are split into `folds`; a pair whose query
    individual (`groups`) is in fold f is scored by a calibrator fitted on pairs with
    neither individual (query's, `candidate_groups`') in fold f."""
    groups = np.asarray(groups)
    candidate_groups = groups if candidate_groups is None else np.asarray(candidate_groups)
    names = np.unique(np.concatenate([groups, candidate_groups]))
    order = np.random.default_rng(0).permutation(len(names))
    fold_of = dict(zip(names[order].tolist(), (np.arange(len(names)) % folds).tolist()))
    fold = np.array([fold_of[g] for g in groups.tolist()], int)
    candidate_fold = np.array([fold_of[g] for g in candidate_groups.tolist()], int)
    deep, inliers, same = np.asarray(deep), np.asarray(inliers), np.asarray(same, bool)
    out = {n: np.zeros(len(same)) for n in ("deep", "local", "fused")}
    for f in range(folds):
        test = fold == f
        train = (fold != f) & (candidate_fold != f)
        if not test.any():
            continue
        calibrator = fit(
            deep[train], inliers[train], same[train], model_fingerprint=model_fingerprint
        )
        for name, p in probabilities(calibrator, deep[test], inliers[test]).items():
            out[name][test] = p
    return out


def ece(probability, same, *, bins: int = 10) -> float:
    """Expected calibration error: |mean predicted - observed share| over equal-width
    probability bins, weighted by their pair counts."""
    p, y = np.asarray(probability, np.float64), np.asarray(same, np.float64)
    if p.size == 0:
        return float("nan")
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.sum() * abs(p[in_bin].mean() - y[in_bin].mean())
    return float(total / p.size)


def default_path(embeddings_meta: dict[str, Any], embeddings_path) -> pathlib.Path:
    """Beside the model (its export dir) when the embeddings name one, else beside them."""
    checkpoint = embeddings_meta.get("checkpoint")
    if checkpoint and pathlib.Path(checkpoint).is_dir():
        return pathlib.Path(checkpoint) / FILE_NAME
    path = pathlib.Path(embeddings_path)
    return path.with_name(f"{path.stem}_{FILE_NAME}")


def save(path, calibrator: dict[str, Any]) -> None:
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(calibrator, indent=2, sort_keys=True))
    os.replace(tmp, path)


def load(path, model_fingerprint: str) -> dict[str, Any]:
    """A saved calibrator, refused when it was fitted for another model."""
    path = pathlib.Path(path)
    try:
        calibrator = json.loads(path.read_text())
        calibrator["weights"]["deep"], calibrator["weights"]["fused"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CalibratorError(f"{path}: not a calibrator ({e}); delete it to refit") from e
    theirs = calibrator.get("model_fingerprint", "")
    if theirs != model_fingerprint:
        raise CalibratorError(
            f"{path}: fitted for model {theirs[:10] or '(unknown)'}, not this model "
            f"{model_fingerprint[:10] or '(unknown)'}: deep scores of two models do not mean the "
            "same; delete it (or pass --refit) to fit one for this model"
        )
    return calibrator
