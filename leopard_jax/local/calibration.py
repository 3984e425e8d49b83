"""Scores -> P(same individual), and their fusion (WildFusion-style).

Each score (deep cosine similarity, local verified inliers) is mapped to a probability by
a logistic calibrator (Platt scaling) fitted on labelled pairs; the fused probability is a
logistic regression on the two calibrated log-odds, so it is calibrated too and learns how
much to trust each. Calibrators must be fitted on individuals other than those they score
(`cross_fit` does this by individual when there is one labelled set).

Why the fusion can fall back to one score: when one score carries no information (a deep
model never trained on real leopards), the two-input regression still fits a weight to
noise and ranks worse than the good score alone. `fit` therefore picks the fusion form
(`FUSIONS`: both, local only, deep only) by log-loss cross-validated over individuals,
keeping a single score unless both are better by over one standard error, and the
calibrator records the choice, so `match` and the review page apply it as fitted.

The calibrator is saved as a small JSON beside the model, tagged with the model's
fingerprint and with what the local score counts (`rerank.SCORE`): the deep score's
meaning changes with the weights, the local one with the matcher, so a calibrator of
another model or another matcher is refused.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from leopard_jax.local import rerank

FILE_NAME = "calibrator.json"
NEW_INDIVIDUAL_THRESHOLD = 0.5
FUSIONS = ("both", "local", "deep")  # what the fused probability is made of
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


def fit(
    deep, inliers, same, *, groups=None, candidate_groups=None, model_fingerprint: str = ""
) -> dict[str, Any]:
    """A calibrator (JSON-ready dict) from labelled pairs: scores and same-individual flags.

    With `groups` (each pair's query individual; `candidate_groups` the candidate's) the
    fusion form is chosen by `select_fusion`; without, it is "both"."""
    x, same = features(deep, inliers), np.asarray(same, bool)
    weights = _fit_weights(x, same)
    calibrator: dict[str, Any] = {
        "model_fingerprint": model_fingerprint,
        "local_score": rerank.SCORE,
        "weights": {n: w.tolist() for n, w in weights.items()},
        "fusion": "both",
        "pairs": int(len(same)),
        "same_pairs": int(same.sum()),
        "new_individual_threshold": NEW_INDIVIDUAL_THRESHOLD,
    }
    if groups is not None:
        calibrator["fusion"], calibrator["fusion_log_loss"] = select_fusion(
            deep, inliers, same, groups, candidate_groups
        )
    return calibrator


def _fit_weights(x: dict[str, np.ndarray], same: np.ndarray) -> dict[str, np.ndarray]:
    weights = {name: fit_logistic(x[name], same) for name in ("deep", "local")}
    weights["fused"] = fit_logistic(_logits(weights, x), same)
    return weights


def _logits(weights, x) -> np.ndarray:
    return np.stack([_logit(_apply(weights[n], x[n])) for n in ("deep", "local")], axis=1)


def select_fusion(deep, inliers, same, groups, candidate_groups=None, *, folds: int = 5):
    """(the fusion form, {form: out-of-fold log-loss}): each form is scored on pairs whose
    individuals its calibrator never saw. Between the single scores the lower log-loss
    wins; "both" replaces it only when its gain is over one standard error of the gain
    summed per query individual (the one-standard-error rule: the simpler form unless the
    data show the richer one is better)."""
    x, same = features(deep, inliers), np.asarray(same, bool)
    groups = np.asarray(groups)
    losses = {name: np.full(len(same), np.nan) for name in FUSIONS}
    for test, train in _folds(groups, candidate_groups, folds):
        try:
            weights = _fit_weights({n: v[train] for n, v in x.items()}, same[train])
        except CalibratorError:  # a fold without both kinds of pair says nothing
            continue
        p = _fused_forms(weights, {n: v[test] for n, v in x.items()})
        for name in FUSIONS:
            losses[name][test] = pair_log_loss(p[name], same[test])
    scored = np.isfinite(losses["both"])
    if not scored.any():
        return "both", {}
    loss = {name: float(v[scored].mean()) for name, v in losses.items()}
    single = min(("local", "deep"), key=loss.__getitem__)
    _, group = np.unique(groups[scored], return_inverse=True)
    gain = np.bincount(group, losses[single][scored] - losses["both"][scored]) / scored.sum()
    error = gain.std(ddof=1) * np.sqrt(len(gain)) if len(gain) > 1 else np.inf
    return ("both" if gain.sum() > error else single), loss


def pair_log_loss(probability, same) -> np.ndarray:
    """-log P(the observed label) per pair."""
    p = np.clip(np.asarray(probability, np.float64), 1e-12, 1 - 1e-12)
    return -np.where(np.asarray(same, bool), np.log(p), np.log1p(-p))


def _apply(w, x) -> np.ndarray:
    w = np.asarray(w, np.float64)
    return _sigmoid(x @ w[:-1] + w[-1])


def _fused_forms(weights, x) -> dict[str, np.ndarray]:
    """P(same) of each score and of each fusion form."""
    out = {n: _apply(weights[n], x[n]) for n in ("deep", "local")}
    return {**out, "both": _apply(weights["fused"], _logits(weights, x))}


def probabilities(calibrator: dict[str, Any], deep, inliers) -> dict[str, np.ndarray]:
    """P(same individual) per pair from each score and fused: {"deep", "local", "fused"}."""
    p = _fused_forms(calibrator["weights"], features(deep, inliers))
    return {"deep": p["deep"], "local": p["local"], "fused": p[calibrator.get("fusion", "both")]}


def _folds(groups, candidate_groups=None, folds: int = 5):
    """(test, train) pair masks: individuals are split into `folds`; fold f tests the pairs
    whose query individual is in f and trains on pairs with neither individual in f."""
    groups = np.asarray(groups)
    candidate_groups = groups if candidate_groups is None else np.asarray(candidate_groups)
    names = np.unique(np.concatenate([groups, candidate_groups]))
    order = np.random.default_rng(0).permutation(len(names))
    fold_of = dict(zip(names[order].tolist(), (np.arange(len(names)) % folds).tolist()))
    fold = np.array([fold_of[g] for g in groups.tolist()], int)
    candidate_fold = np.array([fold_of[g] for g in candidate_groups.tolist()], int)
    for f in range(folds):
        test = fold == f
        if test.any():
            yield test, (fold != f) & (candidate_fold != f)


def cross_fit(
    deep, inliers, same, groups, *, candidate_groups=None, folds: int = 5, model_fingerprint=""
) -> dict[str, np.ndarray]:
    """Out-of-fold probabilities (`_folds`): no pair is scored by a calibrator fitted on
    pairs of its query's individual; each fold's calibrator chooses its own fusion form
    among its training individuals."""
    groups = np.asarray(groups)
    candidate_groups = groups if candidate_groups is None else np.asarray(candidate_groups)
    deep, inliers, same = np.asarray(deep), np.asarray(inliers), np.asarray(same, bool)
    out = {n: np.zeros(len(same)) for n in ("deep", "local", "fused")}
    for test, train in _folds(groups, candidate_groups, folds):
        calibrator = fit(
            deep[train],
            inliers[train],
            same[train],
            groups=groups[train],
            candidate_groups=candidate_groups[train],
            model_fingerprint=model_fingerprint,
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


REFIT = (
    "fit a new one by matching a labelled gallery against itself "
    "(`python -m leopard_jax.match --embeddings LABELLED.npz --rerank local --top-k all "
    "--out M.csv`), which replaces it"
)


def load(path, model_fingerprint: str) -> dict[str, Any]:
    """A saved calibrator, refused when it was fitted for another model or on another
    local score."""
    path = pathlib.Path(path)
    try:
        calibrator = json.loads(path.read_text())
        calibrator["weights"]["deep"], calibrator["weights"]["fused"]  # noqa: B018
        if calibrator.setdefault("fusion", "both") not in FUSIONS:
            raise ValueError(f"fusion {calibrator['fusion']!r} is none of {', '.join(FUSIONS)}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CalibratorError(f"{path}: not a calibrator ({e}); delete it to refit") from e
    counted = calibrator.get("local_score", "verified inliers")  # before it was recorded
    if counted != rerank.SCORE:
        raise CalibratorError(
            f"{path}: fitted on local scores that count {counted}, but this matcher counts "
            f"{rerank.SCORE}; {REFIT}"
        )
    theirs = calibrator.get("model_fingerprint", "")
    if theirs != model_fingerprint:
        raise CalibratorError(
            f"{path}: fitted for model {theirs[:10] or '(unknown)'}, not this model "
            f"{model_fingerprint[:10] or '(unknown)'}: deep scores of two models do not mean the "
            f"same; {REFIT}"
        )
    return calibrator
