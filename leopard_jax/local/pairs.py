"""One pair on screen: its fused P(same individual) and the verified correspondences, and
a picture of them (the two crops side by side, inliers joined by lines) — why the tool
thinks it is the same animal."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from leopard_jax.local import calibration, matching

Keypoints = Callable[[int], tuple[np.ndarray, np.ndarray]]  # row -> (xy, descriptors)


class PairScorer:
    """Scores (anchor row, candidate row) pairs of one embeddings file; cached, since a
    review page asks about the same pairs again on every reload."""

    def __init__(
        self,
        keypoints: Keypoints,
        embeddings: np.ndarray,
        calibrator: dict,
        *,
        model: str = "affine",
        max_keypoints: int = 500,
    ):
        self._keypoints = keypoints
        self._embeddings = embeddings
        self._calibrator = calibrator
        self._model = model
        self._max_keypoints = max_keypoints
        self._cache: dict[tuple[int, int], tuple[float, matching.PairMatch]] = {}

    def score(self, a: int, b: int) -> tuple[float, matching.PairMatch]:
        """(fused P(same individual), verified correspondences) of rows a and b.

        The pair's own evidence: `match` also lifts a candidate through a third photo that
        both verify against (`rerank.expand`); on one pair on screen there is no third
        photo, so a candidate ranked up that way shows its own, lower, probability."""
        if (a, b) not in self._cache:
            found = matching.match_pairs(
                [self._keypoints(a)],
                [self._keypoints(b)],
                model=self._model,
                batch=1,
                max_keypoints=self._max_keypoints,
            )[0]
            deep = float(self._embeddings[a] @ self._embeddings[b])
            p = calibration.probabilities(self._calibrator, [deep], [found.inliers])["fused"][0]
            self._cache[(a, b)] = (float(p), found)
        return self._cache[(a, b)]


def for_embeddings(data, calibrator: dict) -> PairScorer:
    """A scorer reading keypoints from the dataset's feature store (by record key)."""
    from leopard_jax.local import store

    features = store.load(data.meta.get("dataset", ""))
    return PairScorer(
        lambda row: features.get(str(data.keys[row])),
        data.embeddings,
        calibrator,
        max_keypoints=int(features.settings.get("max_keypoints", 500)),
    )


def draw(a_bgr: np.ndarray, b_bgr: np.ndarray, found: matching.PairMatch, height: int = 256):
    """BGR image: crop a | crop b at one height, each verified correspondence a line."""
    import cv2

    scale_a, scale_b = height / a_bgr.shape[0], height / b_bgr.shape[0]
    a = cv2.resize(a_bgr, (max(1, round(a_bgr.shape[1] * scale_a)), height))
    b = cv2.resize(b_bgr, (max(1, round(b_bgr.shape[1] * scale_b)), height))
    canvas = np.concatenate([a, b], axis=1)
    colours = [(60, 220, 60), (40, 200, 255), (255, 160, 40), (200, 80, 255)]
    for i, ((xa, ya), (xb, yb)) in enumerate(zip(found.xy_a, found.xy_b)):
        p = (int(round(xa * scale_a)), int(round(ya * scale_a)))
        q = (int(round(xb * scale_b)) + a.shape[1], int(round(yb * scale_b)))
        colour = colours[i % len(colours)]
        cv2.line(canvas, p, q, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, p, 3, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, q, 3, colour, -1, cv2.LINE_AA)
    return canvas
