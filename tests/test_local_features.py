"""local.features and local.matching: RootSIFT against its definition, the jitted
mutual-NN ratio matcher against a plain-loop reference, verification of a warped copy, and
the symmetric pair score against the two one-way scores it sums."""

from __future__ import annotations

import pathlib
import sys

import cv2
import numpy as np

from leopard_jax.local import features, matching

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
from bench_local import spots  # noqa: E402  (the bench's pattern: one generator for both)


def warp(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    matrix = cv2.getRotationMatrix2D((256, 128), 6.0, 1.1)
    matrix[:, 2] += (12, -8)
    return cv2.warpAffine(image, matrix, (512, 256), borderValue=170), matrix


def test_rootsift_is_the_square_root_of_l1_normalised_sift():
    sift = np.random.default_rng(0).integers(0, 200, size=(5, 128)).astype(np.float32)
    want = np.sqrt(sift / sift.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(features.rootsift(sift), want, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(features.rootsift(sift), axis=1), 1.0, rtol=1e-5)


def test_extract_caps_keypoints_respects_the_mask_and_handles_a_blank_crop():
    image = spots(1)
    xy, desc = features.extract(image, max_keypoints=50, long_side=0)
    assert xy.shape == (50, 2) and desc.shape == (50, 128) and desc.dtype == np.float32
    mask = np.zeros(image.shape, np.uint8)
    mask[:, :256] = 255
    xy, _ = features.extract(image, mask, max_keypoints=300, long_side=0)
    assert len(xy) and xy[:, 0].max() < 256 + 1
    xy, desc = features.extract(np.full((100, 200), 128, np.uint8))
    assert xy.shape == (0, 2) and desc.shape == (0, 128)


def test_extract_reports_positions_in_the_input_image_pixels():
    image = spots(2)
    big = cv2.resize(image, (1024, 512), interpolation=cv2.INTER_LINEAR)
    xy, _ = features.extract(big, long_side=512, max_keypoints=100)
    assert xy[:, 0].max() > 600  # scaled back from the 512-wide working copy


def reference_matches(a, b, ratio):
    """Plain loops: mutual nearest neighbours (Euclidean) passing Lowe's ratio."""
    out = []
    for i, d in enumerate(a):
        dist = np.linalg.norm(b - d, axis=1)
        order = np.argsort(dist)
        j = order[0]
        back = np.argmin(np.linalg.norm(a - b[j], axis=1))
        second = dist[order[1]] if len(b) > 1 else np.inf
        out.append(j if back == i and dist[j] < ratio * second else -1)
    return np.array(out)


def test_mutual_ratio_matches_equal_a_plain_loop_reference_over_padded_pairs():
    rng = np.random.default_rng(3)

    def unit(n):
        x = rng.random((n, 128)).astype(np.float32) ** 4  # peaked, like SIFT histograms
        return features.rootsift(x)

    sets_a = [unit(7), unit(12), unit(3), unit(0)]
    sets_b = [
        np.concatenate([sets_a[0][[2, 0, 5]] + 0.01, unit(6)]),
        unit(9),
        np.concatenate([sets_a[2], unit(1)]),
        unit(4),
    ]
    sets_b = [s / np.linalg.norm(s, axis=1, keepdims=True) for s in sets_b]
    a, a_valid = matching.pad(sets_a, 16)
    b, b_valid = matching.pad(sets_b, 16)
    got = np.asarray(matching.mutual_ratio_matches(a, a_valid, b, b_valid, 0.8))
    for p in range(4):
        want = reference_matches(sets_a[p], sets_b[p], 0.8) if len(sets_a[p]) else []
        np.testing.assert_array_equal(got[p, : len(sets_a[p])], want)
        assert np.all(got[p, len(sets_a[p]) :] == -1)
    assert np.sum(got[0] >= 0) >= 3 and np.sum(got[2] >= 0) == 3  # planted matches found


def test_a_warped_copy_verifies_and_another_pattern_does_not():
    image = spots(4)
    warped, matrix = warp(image)
    one, two, other = (features.extract(x, long_side=0) for x in (image, warped, spots(5)))
    empty = (np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))
    same, different, blank = matching.match_pairs(
        [one, one, empty], [two, other, one], batch=2, symmetric=False
    )
    assert same.inliers >= 30 and different.inliers < 8 and blank.inliers == 0
    # verified correspondences obey the warp (within the RANSAC threshold)
    moved = same.xy_a @ matrix[:, :2].T + matrix[:, 2]
    assert np.median(np.linalg.norm(moved - same.xy_b, axis=1)) < 2.0
    homography = matching.match_pairs([one], [two], model="homography")[0]
    assert homography.inliers >= 30


def test_two_way_matches_are_the_one_way_matches_of_each_crop_as_the_query():
    rng = np.random.default_rng(5)

    def unit(n):
        return features.rootsift(rng.random((n, 128)).astype(np.float32) ** 4)

    sets_a = [unit(9), unit(14), unit(0)]
    # near-copies of a's rows 1, 4, 7 in b, row 1 twice, so a's ratio test and b's disagree
    copies = sets_a[1][[1, 4, 7]] + 0.01
    sets_b = [unit(8), np.concatenate([copies, copies[:1] + 0.002, unit(5)]), unit(3)]
    sets_b = [s / np.linalg.norm(s, axis=1, keepdims=True) for s in sets_b]
    a, a_valid = matching.pad(sets_a, 16)
    b, b_valid = matching.pad(sets_b, 16)
    forward, backward = np.asarray(matching.two_way_matches(a, a_valid, b, b_valid, 0.8))
    np.testing.assert_array_equal(
        forward, np.asarray(matching.mutual_ratio_matches(a, a_valid, b, b_valid, 0.8))
    )
    b_query = np.asarray(matching.mutual_ratio_matches(b, b_valid, a, a_valid, 0.8))
    for p in range(3):  # backward, as (a row -> b row), is b-as-query's matches inverted
        want = {(int(n), j) for j, n in enumerate(b_query[p]) if n >= 0}
        got = {(n, int(m)) for n, m in enumerate(backward[p]) if m >= 0}
        assert got == want
    # a's spot twice in b: fails a's ratio test (its second best is as close), passes b's
    assert forward[1, 1] == -1 and backward[1, 1] in (0, 3)


def test_symmetric_score_is_both_one_way_scores_summed_whichever_crop_is_the_query():
    image = spots(4)
    warped, _ = warp(image)
    one, two, other = (features.extract(x, long_side=0) for x in (image, warped, spots(5)))
    for x, y in ((one, two), (one, other)):
        both = matching.match_pairs([x, y], [y, x], batch=2)
        ways = matching.match_pairs([x, y], [y, x], batch=2, symmetric=False)
        assert both[0].inliers == both[1].inliers == ways[0].inliers + ways[1].inliers
        assert both[0].tentative == ways[0].tentative + ways[1].tentative
        assert len(both[0].xy_a) <= both[0].inliers  # shown once however many ways verified
    assert both[0].inliers < 2 * 8  # the other pattern: at most chance inliers each way


def test_verification_does_not_depend_on_the_order_of_the_correspondences():
    image = spots(6)
    warped, _ = warp(image)
    one, two = (features.extract(x, long_side=0) for x in (image, warped))
    best = np.asarray(
        matching.mutual_ratio_matches(*matching.pad([one[1]], 512), *matching.pad([two[1]], 512))
    )[0]
    rows = np.flatnonzero(best >= 0)
    xy_a, xy_b = one[0][rows], two[0][best[rows]]
    xy_b = xy_b + np.random.default_rng(0).normal(0, 4, xy_b.shape).astype(np.float32)
    mask = matching.verify(xy_a, xy_b)
    shuffle = np.random.default_rng(1).permutation(len(rows))
    np.testing.assert_array_equal(matching.verify(xy_a[shuffle], xy_b[shuffle]), mask[shuffle])
