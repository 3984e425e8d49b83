"""Speed of the local-feature matcher, the `local` part of scripts/bench.py:

    extraction   ms per 256x512 crop on one core (equalise + SIFT + RootSIFT, 500 keypoints)
    matching     ms per pair: jitted mutual-NN ratio test each way (batched) + RANSAC
                 verification of each way (the symmetric pair score)
    re-ranking   seconds for `queries` x top-`top_k` through `local.rerank.local_scores`
                 (pair scores, then the expansion's links), the features held in memory;
                 no pair shared between queries, so every link is matched: the most
                 pairs a re-ranking of this size can cost

    python scripts/bench.py local

Inputs are synthetic rosette patterns (`tests`-style) and their warped copies, so half the
pairs verify with many inliers and half do not, as in a real top-k list.
"""

from __future__ import annotations

import time

import cv2
import numpy as np


def spots(seed: int, size=(256, 512)) -> np.ndarray:
    """A grey flank-like pattern: random dark rosettes on a textured background (the tests
    match on it too)."""
    rng = np.random.default_rng(seed)
    image = np.full(size, 170, np.uint8)
    for _ in range(90):
        x, y = int(rng.integers(0, size[1])), int(rng.integers(0, size[0]))
        axes = (int(rng.integers(5, 16)), int(rng.integers(4, 11)))
        cv2.ellipse(image, (x, y), axes, float(rng.uniform(0, 180)), 0, 360, 40, 3)
    return cv2.GaussianBlur(image, (3, 3), 0)


def _warp(image: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    matrix = cv2.getRotationMatrix2D((256, 128), float(rng.uniform(-8, 8)), 1.05)
    return cv2.warpAffine(image, matrix, (512, 256), borderValue=170)


def bench_local(queries: int = 1000, top_k: int = 20, images: int = 16, pairs: int = 256) -> dict:
    """The three measurements, in a dict of plain numbers."""
    from leopard_jax.local import features, matching

    cv2.setNumThreads(1)  # per core
    crops = [spots(i) for i in range(images)]
    warped = [_warp(c, i) for i, c in enumerate(crops)]
    features.extract(crops[0])  # warm-up
    start = time.perf_counter()
    a = [features.extract(c) for c in crops]
    b = [features.extract(w) for w in warped]
    extract_ms = (time.perf_counter() - start) * 1000 / (2 * images)

    # pairs: each crop against its warped copy (same animal) and another crop's copy
    left = [a[i % images] for i in range(pairs)]
    right = [b[i % images] if i % 2 == 0 else b[(i + 1) % images] for i in range(pairs)]
    matching.match_pairs(left[:64], right[:64])  # compile
    start = time.perf_counter()
    found = matching.match_pairs(left, right)
    pair_ms = (time.perf_counter() - start) * 1000 / pairs
    same = [m.inliers for m in found[0::2]]
    different = [m.inliers for m in found[1::2]]

    rerank_s, rerank_pairs = _rerank(a, b, queries, top_k)
    return {
        "extract_ms_per_crop_per_core": round(extract_ms, 2),
        "keypoints_per_crop": float(np.mean([len(x) for x, _ in a])),
        "match_verify_ms_per_pair": round(pair_ms, 2),
        "inliers_same_median": float(np.median(same)),
        "inliers_different_median": float(np.median(different)),
        "rerank_queries": queries,
        "rerank_top_k": top_k,
        "rerank_seconds": round(rerank_s, 1),
        "rerank_pairs_matched": rerank_pairs,
    }


def _rerank(a, b, queries: int, top_k: int) -> tuple[float, int]:
    """(seconds, pairs matched) of `rerank.local_scores` on `queries` queries, each with
    its own `top_k` gallery crops: first a warped copy of its pattern (the strongly verified
    candidate that lends its matches), then copies of other patterns."""
    from leopard_jax import embeddings_io
    from leopard_jax.local import features, rerank, store

    images = len(a)
    crops = {f"q{i}": a[i % images] for i in range(queries)}
    for i in range(queries):
        for t in range(top_k):
            crops[f"g{i * top_k + t}"] = b[(i + t * 5) % images]  # t = 0: its own pattern
    stores = {"bench": store.Store("bench", crops, {"max_keypoints": features.MAX_KEYPOINTS})}

    def embeddings(prefix: str, n: int):
        keys = [f"{prefix}{i}" for i in range(n)]
        return embeddings_io.make(np.zeros((n, 8)), {"dataset": "bench"}, keys=keys)

    indices = np.arange(queries * top_k).reshape(queries, top_k)
    start = time.perf_counter()
    inliers, _ = rerank.local_scores(
        embeddings("q", queries), embeddings("g", queries * top_k), indices, stores
    )
    seconds = time.perf_counter() - start
    # every crop is its own key, so no pair is met twice: the query pairs, then each link
    return seconds, inliers.size + len(rerank.links(inliers, indices))
