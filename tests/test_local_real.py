"""Local matching on real leopard flanks (../shared/data/spotid_minimum; skipped when
absent): two photos of one flank verify with many inliers, photos of other leopards with
few — the separation behind the re-ranking's numbers."""

from __future__ import annotations

import pathlib

import cv2
import numpy as np
import pytest

from leopard_jax.local import features, matching

DATA = (
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "spotid_minimum" / "cropped"
)

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"no real data at {DATA}")


def keypoints(name: str):
    image = cv2.imread(str(DATA / name))
    assert image is not None, name
    return features.extract(image[..., ::-1])


def test_same_flank_verifies_and_other_leopards_do_not():
    query = keypoints("BGL09_right/0_0_BG-102B-2019-03-01_19-49-36.jpg")
    same = keypoints("BGL09_right/0_0_BG-127B-2019-03-01_02-34-35.jpg")
    others = [
        keypoints(str(p.relative_to(DATA)))
        for folder in ("BHA32_Right", "BRL17_Left", "CUL66_Left")
        for p in sorted((DATA / folder).glob("*.jpg"))[:2]
    ]
    found = matching.match_pairs([query] * (1 + len(others)), [same, *others], batch=8)
    assert found[0].inliers >= 25
    assert max(m.inliers for m in found[1:]) < 12


# a close-up whose flash-white head fills the frame: no verified match to anything yet
UNMATCHED = {"0_0_CU-233B-2016-01-28_20-52-29.jpg"}


@pytest.fixture(scope="module")
def all_pairs():
    """(paths, flank names, inliers [n, n], -1 on the diagonal): every crop against every
    other, each pair matched once."""
    paths = sorted(DATA.glob("*/*.jpg"))
    found = [keypoints(str(p.relative_to(DATA))) for p in paths]
    names = np.array([p.parent.name for p in paths])
    pairs = [(i, j) for i in range(len(paths)) for j in range(i + 1, len(paths))]
    matches = matching.match_pairs([found[i] for i, _ in pairs], [found[j] for _, j in pairs])
    inliers = np.full((len(paths), len(paths)), -1)
    for (i, j), m in zip(pairs, matches):
        inliers[i, j] = inliers[j, i] = m.inliers
    return paths, names, inliers


def test_every_flank_photo_finds_its_own_leopard_first(all_pairs):
    """All crops against each other: each one's most-inlier partner is the same flank,
    washed-out flash photos included."""
    paths, names, inliers = all_pairs
    wrong = [
        (paths[i].name, names[int(np.argmax(inliers[i]))])
        for i in range(len(paths))
        if names[int(np.argmax(inliers[i]))] != names[i] and paths[i].name not in UNMATCHED
    ]
    assert not wrong


# a motion-blurred daylight shot: strongly verified with one photo of its flank only
BLURRED = "0_0_CU-234A-2016-01-29_07-08-25.jpg"


def test_the_expansion_brings_the_blurred_shot_its_mates_through_a_third_photo(all_pairs):
    """Through the one photo it verifies strongly with, the blurred shot reaches more of
    its flank, and the flank ranking as a whole improves (DT5AP, as `evaluate`)."""
    from leopard_jax import metrics
    from leopard_jax.local import rerank

    paths, names, inliers = all_pairs
    n = len(paths)
    indices = np.array([[j for j in range(n) if j != q] for q in range(n)])
    pair = np.take_along_axis(inliers, indices, axis=1)
    expanded = rerank.expand(pair, indices, lambda j, g: int(inliers[j, g]))
    mates = np.array([(names == names[i]).sum() - 1 for i in range(n)])
    blurred = [p.name for p in paths].index(BLURRED)
    figures = {}
    for label, score in (("pair", pair.astype(float)), ("expanded", expanded)):
        order = np.argsort(-score, axis=1, kind="stable")
        same = names[np.take_along_axis(indices, order, axis=1)] == names[:, None]
        dtkap, _ = metrics.precision_curves(same[:, :5], mates)
        figures[label] = (float(np.asarray(dtkap)[:, 4].mean()), int(same[blurred, :5].sum()))
    assert figures["expanded"][1] > figures["pair"][1], figures  # mates in its top 5
    assert figures["expanded"][0] > figures["pair"][0], figures
