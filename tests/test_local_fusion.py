"""Histogram equalisation before SIFT, distinct correspondences, and the choice of fusion
form: equalisation against OpenCV's own, a washed-out photo recovered by it, repeated
correspondences counted once, the fusion falling back to the score that carries
information, and the choice travelling through the calibrator JSON."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from test_local_features import spots, warp

from leopard_jax.local import calibration, features, matching, rerank


def test_equalize_is_opencvs_over_the_whole_crop_and_uses_only_the_masked_levels():
    grey = np.random.default_rng(0).integers(30, 90, (50, 60)).astype(np.uint8)
    np.testing.assert_array_equal(features.equalize(grey), cv2.equalizeHist(grey))
    np.testing.assert_array_equal(
        features.equalize(grey, np.ones_like(grey)), cv2.equalizeHist(grey)
    )
    # the animal's levels (left half, 100..109) span 0..255; the background's do not count
    two = np.where(np.arange(60)[None, :] < 30, 100 + np.arange(50)[:, None] % 10, 200)
    two = two.astype(np.uint8)
    mask = np.zeros_like(two)
    mask[:, :30] = 1
    out = features.equalize(two, mask)
    assert out[:, :30].min() == 0 and out[:, :30].max() == 255
    np.testing.assert_array_equal(features.equalize(two, np.zeros_like(two)), two)


def test_equalisation_recovers_a_washed_out_pattern():
    """Flash-lit: the rosettes only a few grey levels below the white fur."""
    image = spots(6)
    warped = warp(image)[0]
    washed = [
        (240 + (x.astype(np.float32) - 40) * 12 / 130).astype(np.uint8) for x in (image, warped)
    ]
    found = {}
    for equal in (False, True):
        one, two = (features.extract(x, long_side=0, equalize_histogram=equal) for x in washed)
        found[equal] = (len(one[0]), matching.match_pairs([one], [two])[0].inliers)
    assert found[True][0] > 2 * found[False][0]
    assert found[True][1] >= 30 and found[True][1] > 2 * found[False][1]


def test_distinct_drops_repeated_correspondences_keeping_the_first():
    xy_a = np.array([[1, 1], [2, 2], [1, 1], [1, 1]], np.float32)
    xy_b = np.array([[5, 5], [6, 6], [5, 5], [7, 7]], np.float32)
    a, b = matching.distinct(xy_a, xy_b)
    np.testing.assert_array_equal(a, [[1, 1], [2, 2], [1, 1]])
    np.testing.assert_array_equal(b, [[5, 5], [6, 6], [7, 7]])


def labelled_pairs(deep_informative: bool, seed=0, individuals=40, per=30):
    """Pairs of `individuals` query animals: local inliers separate same from different
    on 3 of 4 same pairs; the deep cosine is noise, or (deep_informative) catches the rest."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(individuals), per).astype(str)
    candidates = np.roll(groups, per // 2)
    same = rng.random(len(groups)) < 0.2
    local_sees = same & (rng.random(len(groups)) < 0.75)
    inliers = np.where(
        local_sees, rng.integers(20, 60, len(groups)), rng.integers(0, 8, len(groups))
    )
    deep = rng.normal(0.0, 0.2, len(groups))
    if deep_informative:
        deep = deep + np.where(same, 0.8, 0.0)
    return deep, inliers, same, groups, candidates


def test_fusion_falls_back_to_local_when_deep_is_noise_and_fuses_when_both_inform():
    deep, inliers, same, groups, candidates = labelled_pairs(deep_informative=False)
    noise = calibration.fit(deep, inliers, same, groups=groups, candidate_groups=candidates)
    assert noise["fusion"] == "local"
    p = calibration.probabilities(noise, deep, inliers)
    np.testing.assert_array_equal(p["fused"], p["local"])
    assert set(noise["fusion_log_loss"]) == set(calibration.FUSIONS)

    deep, inliers, same, groups, candidates = labelled_pairs(deep_informative=True)
    both = calibration.fit(deep, inliers, same, groups=groups, candidate_groups=candidates)
    assert both["fusion"] == "both"
    assert both["fusion_log_loss"]["both"] < both["fusion_log_loss"]["local"]
    # without individuals to cross-validate over, the two-score fusion stays
    assert calibration.fit(deep, inliers, same)["fusion"] == "both"


def test_the_chosen_fusion_is_saved_applied_without_refitting_and_checked_on_load(tmp_path):
    deep, inliers, same, groups, candidates = labelled_pairs(deep_informative=False)
    fitted = calibration.fit(
        deep, inliers, same, groups=groups, candidate_groups=candidates, model_fingerprint="m1"
    )
    path = tmp_path / calibration.FILE_NAME
    calibration.save(path, fitted)
    loaded = calibration.load(path, "m1")
    assert loaded["fusion"] == "local"
    np.testing.assert_array_equal(
        calibration.probabilities(loaded, [0.9, -0.9], [3, 40])["fused"],
        calibration.probabilities(loaded, [0.9, -0.9], [3, 40])["local"],
    )
    # a calibrator written before the fusion choice existed fuses both scores
    old = {k: v for k, v in fitted.items() if k not in ("fusion", "fusion_log_loss")}
    calibration.save(path, old)
    assert calibration.load(path, "m1")["fusion"] == "both"
    path.write_text(json.dumps({**fitted, "fusion": "average"}))
    with pytest.raises(calibration.CalibratorError, match="fusion 'average'"):
        calibration.load(path, "m1")
    # one fitted on another count of local matches (before the two-way score: one way)
    assert fitted["local_score"] == rerank.SCORE
    one_way = {k: v for k, v in fitted.items() if k != "local_score"}
    path.write_text(json.dumps(one_way))
    with pytest.raises(calibration.CalibratorError, match="count verified inliers, but"):
        calibration.load(path, "m1")
    # one fitted on the pair score before the expansion: refused, naming the refit command
    path.write_text(json.dumps({**fitted, "local_score": matching.SCORE}))
    with pytest.raises(calibration.CalibratorError, match="--rerank local --top-k all"):
        calibration.load(path, "m1")


def test_cross_fitted_fusion_is_never_below_the_better_single_score_on_noise_deep():
    from leopard_jax.match_eval import auroc

    deep, inliers, same, groups, candidates = labelled_pairs(deep_informative=False, seed=1)
    out = calibration.cross_fit(deep, inliers, same, groups, candidate_groups=candidates)
    assert auroc(out["fused"], same) >= auroc(out["local"], same)
