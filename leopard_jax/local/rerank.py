"""A query's deep top-k re-scored by local matches: verified inliers per (query, candidate)
pair, counted both ways (`matching.match_pairs`), so the score does not depend on which crop
is the query."""

from __future__ import annotations

import numpy as np

from leopard_jax import embeddings_io
from leopard_jax.local import matching, store


def stores_for(*sets: embeddings_io.Embeddings) -> dict[str, store.Store]:
    """The feature store of each dataset the embeddings come from (by meta["dataset"])."""
    out: dict[str, store.Store] = {}
    for data in sets:
        dataset = data.meta.get("dataset", "")
        if dataset not in out:
            out[dataset] = store.load(dataset)
    return out


def pair_matches(
    queries: embeddings_io.Embeddings,
    gallery: embeddings_io.Embeddings,
    indices: np.ndarray,
    stores: dict[str, store.Store],
    *,
    model: str = "affine",
    batch: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Pair scores int32 [Q, k] (verified inliers, both ways summed) for every candidate in
    `indices` (-1 where empty).

    The score is symmetric, so a pair met twice — (a, b) and (b, a), as when a labelled
    gallery is matched against itself — is matched once."""
    from tqdm import tqdm

    def crop(data: embeddings_io.Embeddings, row: int) -> tuple[str, str]:
        return data.meta.get("dataset", ""), str(data.keys[row])  # (feature store, key)

    inliers = np.full(indices.shape, -1, np.int32)
    rows, cols = np.nonzero(indices >= 0)
    unique: dict[tuple, int] = {}  # unordered pair of crops -> its place in `pairs`
    which = np.array(
        [
            unique.setdefault(tuple(sorted((crop(queries, r), crop(gallery, g)))), len(unique))
            for r, g in zip(rows, indices[rows, cols])
        ],
        np.int64,
    )
    pairs = list(unique)
    scores = np.zeros(len(pairs), np.int32)
    max_keypoints = max(int(s.settings.get("max_keypoints", 500)) for s in stores.values())
    step = batch * 16
    with tqdm(total=len(pairs), desc="local match", unit="pair", disable=not progress) as bar:
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            found = matching.match_pairs(
                [stores[dataset].get(key) for (dataset, key), _ in chunk],
                [stores[dataset].get(key) for _, (dataset, key) in chunk],
                max_keypoints=max_keypoints,
                batch=batch,
                model=model,
            )
            scores[start : start + len(chunk)] = [m.inliers for m in found]
            bar.update(len(chunk))
    inliers[rows, cols] = scores[which]
    return inliers
