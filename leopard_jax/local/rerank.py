"""A query's deep top-k re-scored by local matches: verified inliers per (query, candidate)
pair, counted both ways (`matching.match_pairs`), so the score does not depend on which crop
is the query; then expanded through the query's strongly verified candidates (`expand`).

Why the expansion (spatially verified query expansion, Chum et al. 2007, the standard
companion of SIFT + RANSAC retrieval): a photo can share few verifiable spots with most
photos of its flank (motion blur, another pose) while verifying strongly against one of
them, which shares spots with the rest. On spotid_minimum such a blurred daylight shot had
local DT5AP 0.713 and the set 0.980; with the expansion 0.960 and 0.987, while
leopardtrails_faces (pairs only, so nothing to expand through) is unchanged at 0.750
(`match --rerank local --top-k all` + `evaluate --matches`). EXPAND_MIN_INLIERS and
EXPAND_WEIGHT were chosen on those two sets, the only labelled ones here (WORKSPACE lists
what else was tried); a score reached through a third photo counts half, so it never
outranks an equal direct one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from leopard_jax import embeddings_io
from leopard_jax.local import matching, store

EXPAND_MIN_INLIERS = 15  # a candidate this strongly verified lends its own matches
EXPAND_WEIGHT = 0.5  # a score through a neighbour: this times its weaker link
# only the strongest candidate lends its matches: at most k - 1 more pairs per query, which
# bounds the re-ranking cost at twice the pairs; more neighbours changed nothing on the two
# labelled sets (1, 2, 3, 5 or all: the same DT5AP)
EXPAND_NEIGHBOURS = 1
# What the local score counts; a calibrator fitted on another count is refused (`calibration`).
SCORE = (
    f"{matching.SCORE}, expanded through the best {EXPAND_NEIGHBOURS} candidate(s) with >= "
    f"{EXPAND_MIN_INLIERS} ({EXPAND_WEIGHT} x the weaker link)"
)

Crop = tuple[str, str]  # (feature store, record key)


def stores_for(*sets: embeddings_io.Embeddings) -> dict[str, store.Store]:
    """The feature store of each dataset the embeddings come from (by meta["dataset"])."""
    out: dict[str, store.Store] = {}
    for data in sets:
        dataset = data.meta.get("dataset", "")
        if dataset not in out:
            out[dataset] = store.load(dataset)
    return out


def _crop(data: embeddings_io.Embeddings, row: int) -> Crop:
    return data.meta.get("dataset", ""), str(data.keys[row])


def _pair(a: Crop, b: Crop) -> tuple[Crop, Crop]:
    """An unordered pair of crops: the pair score is symmetric, so (a, b) is (b, a)."""
    return (a, b) if a <= b else (b, a)


def score_pairs(
    pairs, stores: dict[str, store.Store], known: dict, *, model: str, batch: int, progress: bool
) -> None:
    """Put in `known` (unordered pair of crops -> pair score: verified inliers, both ways
    summed) every pair of `pairs` not yet in it, each matched once."""
    from tqdm import tqdm

    todo = [p for p in dict.fromkeys(pairs) if p not in known]
    if not todo:
        return
    max_keypoints = max(int(s.settings.get("max_keypoints", 500)) for s in stores.values())
    step = batch * 16
    with tqdm(total=len(todo), desc="local match", unit="pair", disable=not progress) as bar:
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            found = matching.match_pairs(
                [stores[dataset].get(key) for (dataset, key), _ in chunk],
                [stores[dataset].get(key) for _, (dataset, key) in chunk],
                max_keypoints=max_keypoints,
                batch=batch,
                model=model,
            )
            known.update(zip(chunk, (m.inliers for m in found)))
            bar.update(len(chunk))


def pair_matches(
    queries: embeddings_io.Embeddings,
    gallery: embeddings_io.Embeddings,
    indices: np.ndarray,
    stores: dict[str, store.Store],
    *,
    model: str = "affine",
    batch: int = 64,
    progress: bool = False,
    known: dict | None = None,
) -> np.ndarray:
    """Pair scores int32 [Q, k] (verified inliers, both ways summed) for every candidate in
    `indices` (-1 where empty).

    The score is symmetric, so a pair met twice — (a, b) and (b, a), as when a labelled
    gallery is matched against itself — is matched once. `known` (pair -> score) holds
    pairs already matched, and gets the new ones."""
    known = {} if known is None else known
    rows, cols = np.nonzero(indices >= 0)
    wanted = [
        _pair(_crop(queries, r), _crop(gallery, g)) for r, g in zip(rows, indices[rows, cols])
    ]
    score_pairs(wanted, stores, known, model=model, batch=batch, progress=progress)
    inliers = np.full(indices.shape, -1, np.int32)
    inliers[rows, cols] = [known[p] for p in wanted]
    return inliers


def neighbours(inliers: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Columns of one query's candidates that lend their matches: pair score >=
    EXPAND_MIN_INLIERS, the EXPAND_NEIGHBOURS highest (ties: the deep order)."""
    strong = np.flatnonzero((inliers >= EXPAND_MIN_INLIERS) & (indices >= 0))
    return strong[np.argsort(-inliers[strong], kind="stable")][:EXPAND_NEIGHBOURS]


def _routes(inliers: np.ndarray, indices: np.ndarray):
    """Each way a query reaches a candidate through a neighbour: (query, column of the
    candidate, the query-neighbour pair score, neighbour row j, candidate row g), for every
    `neighbours` j of the query and every other candidate g of it."""
    for q in range(len(indices)):
        for c in neighbours(inliers[q], indices[q]):
            j = int(indices[q, c])
            for col, g in enumerate(indices[q]):
                if g >= 0 and g != j:
                    yield q, col, int(inliers[q, c]), j, int(g)


def links(inliers: np.ndarray, indices: np.ndarray) -> set[tuple[int, int]]:
    """The gallery pairs (j, g) `expand` reads (`_routes`)."""
    return {(j, g) for *_, j, g in _routes(inliers, indices)}


def expand(
    inliers: np.ndarray, indices: np.ndarray, between: Callable[[int, int], int]
) -> np.ndarray:
    """Local scores float [Q, k]: for candidate g of query q, the larger of its own pair
    score S(q, g) and EXPAND_WEIGHT x min(S(q, j), S(j, g)) over q's `neighbours` j;
    `between(j, g)` is the pair score of gallery rows j, g. Empty slots (-1) stay -1."""
    scores = inliers.astype(np.float64)
    for q, col, link, j, g in _routes(inliers, indices):
        scores[q, col] = max(scores[q, col], EXPAND_WEIGHT * min(link, between(j, g)))
    return scores


def local_scores(
    queries: embeddings_io.Embeddings,
    gallery: embeddings_io.Embeddings,
    indices: np.ndarray,
    stores: dict[str, store.Store],
    *,
    model: str = "affine",
    batch: int = 64,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(pair scores int32 [Q, k] as `pair_matches`, local scores float [Q, k] as `expand`).

    The links the expansion reads are matched here when this run has not met them (a
    labelled gallery matched against itself with `--top-k all` has met them all)."""
    known: dict = {}
    inliers = pair_matches(
        queries, gallery, indices, stores, model=model, batch=batch, progress=progress, known=known
    )
    needed = {
        (j, g): _pair(_crop(gallery, j), _crop(gallery, g)) for j, g in links(inliers, indices)
    }
    score_pairs(needed.values(), stores, known, model=model, batch=batch, progress=progress)
    return inliers, expand(inliers, indices, lambda j, g: known[needed[(j, g)]])
