"""Local matching on real leopard flanks (../shared/data/spotid_minimum; skipped when
absent): two photos of one flank verify with many inliers, photos of other leopards with
few — the separation behind the re-ranking's numbers."""

from __future__ import annotations

import pathlib

import cv2
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
