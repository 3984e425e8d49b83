"""A query's deep top-k re-scored by local matches: inliers per (query, candidate) pair."""

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


def keypoints(data: embeddings_io.Embeddings, stores: dict[str, store.Store], row: int):
    return stores[data.meta.get("dataset", "")].get(str(data.keys[row]))


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
    """Verified inliers int32 [Q, k] for every candidate in `indices` (-1 where empty)."""
    from tqdm import tqdm

    inliers = np.full(indices.shape, -1, np.int32)
    rows, cols = np.nonzero(indices >= 0)
    max_keypoints = max(int(s.settings.get("max_keypoints", 500)) for s in stores.values())
    step = batch * 16
    with tqdm(total=len(rows), desc="local match", unit="pair", disable=not progress) as bar:
        for start in range(0, len(rows), step):
            r, c = rows[start : start + step], cols[start : start + step]
            a = [keypoints(queries, stores, i) for i in r]
            b = [keypoints(gallery, stores, j) for j in indices[r, c]]
            found = matching.match_pairs(
                a, b, max_keypoints=max_keypoints, batch=batch, model=model
            )
            inliers[r, c] = [m.inliers for m in found]
            bar.update(len(r))
    return inliers
