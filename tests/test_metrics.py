"""Retrieval metrics against plain-loop references written from the paper's definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leopard_jax import distances, metrics, ranking

K_MAX = 10


# --- independent references: plain loops, float64 ----------------------------------


def ref_distance(a, b, metric):
    a = [float(v) for v in a]
    b = [float(v) for v in b]
    if metric == "euclidean":
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))
    return 1.0 - ref_cos(a, b)


def ref_cos(a, b):
    dot = sum(float(x) * float(y) for x, y in zip(a, b))
    na = math.sqrt(sum(float(x) ** 2 for x in a))
    nb = math.sqrt(sum(float(y) ** 2 for y in b))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def ref_ranking(emb, i, metric):
    """Other samples of query i, nearest first, equal distances by lower index."""
    others = [j for j in range(len(emb)) if j != i]
    return sorted(others, key=lambda j: (ref_distance(emb[i], emb[j], metric), j))


def ref_metrics(emb, labels, k_max, metric):
    n = len(labels)
    sizes = {c: list(labels).count(c) for c in set(labels)}
    dtkap = {k: [] for k in range(1, k_max + 1)}
    tkrmd = {k: [] for k in range(1, k_max + 1)}
    ratios = []
    for i in range(n):
        ranked = ref_ranking(emb, i, metric)
        match = [labels[j] == labels[i] for j in ranked]
        mates = sizes[labels[i]] - 1
        if mates > 0:
            for k in range(1, k_max + 1):
                k_i = min(mates, k)
                precisions = [sum(match[:j]) / j for j in range(1, k_i + 1)]
                dtkap[k].append(sum(precisions) / k_i)
                tkrmd[k].append(1.0 if any(match[:k]) else 0.0)
        intra = [
            ref_distance(emb[i], emb[j], metric)
            for j in range(n)
            if j != i and labels[j] == labels[i]
        ]
        inter = [ref_distance(emb[i], emb[j], metric) for j in range(n) if labels[j] != labels[i]]
        if intra and inter:
            ratios.append((sum(intra) / len(intra)) / (sum(inter) / len(inter)))
    same_angles, diff_angles, all_angles = [], [], []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            angle = math.degrees(math.acos(max(-1.0, min(1.0, ref_cos(emb[i], emb[j])))))
            (same_angles if labels[i] == labels[j] else diff_angles).append(angle)
            if i < j:
                all_angles.append(angle)
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return {
        "DTkAP": [mean(dtkap[k]) if dtkap[k] else 0.0 for k in range(1, k_max + 1)],
        "TkRMD": [mean(tkrmd[k]) if tkrmd[k] else 0.0 for k in range(1, k_max + 1)],
        "n_queries": len(dtkap[1]),
        "CCDR": mean(ratios),
        "angle_same_mean": mean(same_angles),
        "angle_diff_mean": mean(diff_angles),
        "angles_smallest": sorted(all_angles)[:10],
    }


# --- data ---------------------------------------------------------------------------


def uneven_labels(rng, n):
    """Class sizes 1..8 (several singletons), shuffled."""
    sizes = [1, 1, 1, 2, 2, 3, 4, 5, 6, 8, 1, 7, 3, 2, 1]
    labels = np.repeat(np.arange(len(sizes)), sizes)[:n]
    assert len(labels) == n
    return rng.permutation(labels)


@pytest.fixture(scope="module")
def gaussian_data():
    rng = np.random.default_rng(0)
    n = 47
    return rng.normal(size=(n, 6)).astype(np.float32), uneven_labels(rng, n)


@pytest.fixture(scope="module")
def tied_data():
    """±1 vectors in 6-d: 64 distinct points, equal norms, many exactly equal distances
    (duplicates and equal dot products) in float32 and float64 alike."""
    rng = np.random.default_rng(1)
    n = 47
    emb = rng.choice([-1.0, 1.0], size=(n, 6)).astype(np.float32)
    return emb, uneven_labels(rng, n)


def assert_matches_reference(got, ref):
    np.testing.assert_allclose(got["DTkAP"], ref["DTkAP"], atol=1e-6)
    np.testing.assert_allclose(got["TkRMD"], ref["TkRMD"], atol=1e-12)
    assert got["n_queries"] == ref["n_queries"]
    np.testing.assert_allclose(got["CCDR"], ref["CCDR"], rtol=1e-5)
    np.testing.assert_allclose(got["angle_same_mean"], ref["angle_same_mean"], atol=2e-3)
    np.testing.assert_allclose(got["angle_diff_mean"], ref["angle_diff_mean"], atol=2e-3)
    np.testing.assert_allclose(got["angles_smallest"], ref["angles_smallest"], atol=2e-2)


# --- against the references ---------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("data", ["gaussian_data", "tied_data"])
def test_retrieval_metrics_match_reference(request, data, metric):
    emb, labels = request.getfixturevalue(data)
    ref = ref_metrics(emb.tolist(), labels.tolist(), K_MAX, metric)
    got = metrics.retrieval_metrics(emb, labels, k_max=K_MAX, metric=metric, chunk=8)
    assert_matches_reference(got, ref)
    assert got["DT5AP"] == got["DTkAP"][4] and got["T1RMD"] == got["TkRMD"][0]
    assert got["n_samples"] == len(labels) and got["n_classes"] == 15


def test_tied_data_really_has_ties(tied_data):
    emb, _ = tied_data
    d = distances.distance_matrix(emb)
    first_row = np.delete(d[0], 0)
    assert len(np.unique(first_row)) < len(first_row) // 3


def test_chunk_size_does_not_change_results(gaussian_data):
    emb, labels = gaussian_data
    whole = metrics.retrieval_metrics(emb, labels, k_max=K_MAX, chunk=len(labels))
    for chunk in (1, 8):
        got = metrics.retrieval_metrics(emb, labels, k_max=K_MAX, chunk=chunk)
        # Rankings are exact; distances may differ in the last bit with the matmul shape.
        assert got["DTkAP"] == whole["DTkAP"] and got["TkRMD"] == whole["TkRMD"]
        for key in ("CCDR", "angle_same_mean", "angle_diff_mean", "angles_smallest"):
            np.testing.assert_allclose(got[key], whole[key], rtol=1e-5)


def test_string_labels_equal_int_labels(gaussian_data):
    emb, labels = gaussian_data
    names = np.array([f"leopard_{v:03d}" for v in labels])
    assert metrics.retrieval_metrics(emb, names, chunk=8) == metrics.retrieval_metrics(
        emb, labels, chunk=8
    )


def test_jax_input_equals_numpy_input(gaussian_data):
    emb, labels = gaussian_data
    assert metrics.retrieval_metrics(
        jnp.asarray(emb), jnp.asarray(labels), chunk=8
    ) == metrics.retrieval_metrics(emb, labels, chunk=8)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_distance_matrix_matches_reference(gaussian_data, metric):
    emb, _ = gaussian_data
    emb = emb[:9]
    ref = np.array([[ref_distance(a, b, metric) for b in emb.tolist()] for a in emb.tolist()])
    got = distances.distance_matrix(emb, metric=metric)
    off_diagonal = ~np.eye(len(emb), dtype=bool)
    np.testing.assert_allclose(got[off_diagonal], ref[off_diagonal], atol=2e-6)
    # Gram-matrix form: near-zero Euclidean distances are only good to ~sqrt(eps)·|x|.
    np.testing.assert_allclose(np.diag(got), 0.0, atol=1e-6 if metric == "cosine" else 3e-3)


def test_ranking_follows_the_metrics_reference_ranking_with_ties(tied_data):
    """ranking.top_k (match lists, review candidates) ranks as the metrics do. ±1 vectors
    have equal norms, so the dot product orders them as the cosine does, exactly."""
    emb, _ = tied_data
    idx, score = ranking.top_k(
        emb, emb, 6, exclude=ranking.same_row, query_block=8, gallery_block=16
    )
    dist = 1.0 - score / 6.0  # |x|² = 6
    for i in range(len(emb)):
        ranked = ref_ranking(emb.tolist(), i, "cosine")[:6]
        assert idx[i].tolist() == ranked
        np.testing.assert_allclose(
            dist[i], [ref_distance(emb[i], emb[j], "cosine") for j in ranked], atol=2e-6
        )


def test_single_metric_functions_agree_with_the_pass(gaussian_data):
    emb, labels = gaussian_data
    full = metrics.retrieval_metrics(emb, labels, k_max=K_MAX, chunk=8)
    assert metrics.dtkap(emb, labels, k=K_MAX, chunk=8) == full["DT10AP"]
    assert metrics.tkrmd(emb, labels, k_max=K_MAX, chunk=8) == full["TkRMD"]
    assert metrics.ccdr(emb, labels, chunk=8) == full["CCDR"]
    angles = metrics.angular_separation(emb, labels, chunk=8)
    assert angles["angles_smallest"] == full["angles_smallest"]


# --- the paper's worked example -----------------------------------------------------


def unit(degrees):
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_paper_worked_example_single_match_at_rank_four():
    """Query 0's class has 6 images (k_i = 5); its only match in the top 5 is at rank 4:
    DT5AP = (1/5)(0 + 0 + 0 + 1/4 + 1/5) = 0.09 and T5RMD = 1."""
    angles = [0, 10, 20, 30, 40, 50, 120, 130, 140, 150]
    labels = [0, 1, 2, 3, 0, 4, 0, 0, 0, 0]
    per_query = metrics.per_query_metrics(
        np.array([unit(a) for a in angles]), labels, k_max=5, chunk=8
    )
    assert per_query["class_mates"][0] == 5
    assert per_query["DTkAP"][0, 4] == pytest.approx(0.09, abs=1e-7)
    assert per_query["match_in_top_k"][0].tolist() == [False, False, False, True, True]


# --- angles near 0° ----------------------------------------------------------------


def ref_angle(a, b):
    """float64 angle in degrees: atan2(|a × b|, a · b), |a × b|² by Lagrange's identity."""
    a = np.asarray(a, np.float64) / np.linalg.norm(np.asarray(a, np.float64))
    b = np.asarray(b, np.float64) / np.linalg.norm(np.asarray(b, np.float64))
    dot = float(a @ b)
    return math.degrees(math.atan2(math.sqrt(max(float((a @ a) * (b @ b)) - dot * dot, 0.0)), dot))


def near_duplicates():
    """Random 8-d rows plus: two exact copies of row 0 (three pairs at exactly 0°), row 1
    scaled by 3 (same direction), row 2 turned by 0.001°, 0.01° and 0.1°."""
    rng = np.random.default_rng(7)
    base = rng.normal(size=(8, 8))
    b = base[2] / np.linalg.norm(base[2])
    u = rng.normal(size=8)
    u -= (u @ b) * b
    u /= np.linalg.norm(u)
    turned = [np.cos(np.radians(t)) * b + np.sin(np.radians(t)) * u for t in (1e-3, 1e-2, 0.1)]
    emb = np.vstack([base, base[0], base[0], 3 * base[1], *turned]).astype(np.float32)
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 1, 2, 2, 3]
    return emb, labels


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_angles_of_duplicates_and_near_duplicates_match_float64(metric):
    emb, labels = near_duplicates()
    n = len(emb)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    angle = {p: ref_angle(emb[p[0]], emb[p[1]]) for p in pairs}
    same = [angle[i, j] for i, j in pairs if labels[i] == labels[j]]
    diff = [angle[i, j] for i, j in pairs if labels[i] != labels[j]]
    got = metrics.retrieval_metrics(emb, labels, metric=metric, chunk=5)
    assert got["angles_smallest"][:3] == [0.0, 0.0, 0.0]  # the exact copies
    np.testing.assert_allclose(got["angles_smallest"], sorted(angle.values())[:10], atol=1e-4)
    assert 0.0005 < got["angles_smallest"][4] < 0.0015  # 0.001°, not arccos noise (~0.03°)
    np.testing.assert_allclose(got["angle_same_mean"], np.mean(same), atol=1e-4)
    np.testing.assert_allclose(got["angle_diff_mean"], np.mean(diff), atol=1e-4)


def test_angle_degrees_is_stable_at_0_and_180_degrees():
    rng = np.random.default_rng(8)
    a = rng.normal(size=(6, 5))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = np.array(
        [a[0], a[1] + 1e-6 * rng.normal(size=5), -a[2], rng.normal(size=5), a[4], np.zeros(5)]
    )
    b[1:4] /= np.linalg.norm(b[1:4], axis=1, keepdims=True)
    a[5] = 0.0
    got = np.asarray(
        distances.angle_degrees(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    )
    want = [ref_angle(x, y) for x, y in zip(a[:5].astype(np.float32), b[:5].astype(np.float32))]
    assert got[0] == 0.0 and got[4] == 0.0 and got[5] == 90.0  # bit-equal rows; both zero
    np.testing.assert_allclose(got[:5], want, atol=1e-4)
    assert abs(got[2] - 180.0) < 1e-4


# --- edge cases ---------------------------------------------------------------------


def test_every_class_a_singleton_gives_documented_values():
    emb = np.random.default_rng(2).normal(size=(6, 4))
    got = metrics.retrieval_metrics(emb, np.arange(6), k_max=10, chunk=4)
    assert got["n_queries"] == 0
    assert got["DTkAP"] == [0.0] * 5 and got["TkRMD"] == [0.0] * 5
    assert math.isnan(got["CCDR"]) and math.isnan(got["angle_same_mean"])
    assert math.isfinite(got["angle_diff_mean"])


def test_one_class_only_gives_documented_values():
    emb = np.random.default_rng(3).normal(size=(6, 4))
    got = metrics.retrieval_metrics(emb, ["a"] * 6, k_max=10, chunk=4)
    assert got["k_max"] == 5  # capped at N - 1
    assert got["DTkAP"] == [1.0] * 5 and got["TkRMD"] == [1.0] * 5
    assert got["n_queries"] == 6
    assert math.isnan(got["CCDR"]) and math.isnan(got["angle_diff_mean"])
    assert len(got["angles_smallest"]) == 5


def test_zero_embedding_does_not_break_metrics():
    emb = np.random.default_rng(4).normal(size=(6, 4))
    emb[2] = 0.0
    got = metrics.retrieval_metrics(emb, [0, 0, 1, 1, 2, 2], k_max=10, chunk=4)
    assert all(math.isfinite(v) for v in got["DTkAP"] + [got["CCDR"]])


def test_collapsed_embeddings_give_nan_ccdr_not_rounding_noise():
    """Every embedding the same direction (an untrained or collapsed model): 1 − cos is
    ±1e-7 noise, so the ratio is undefined; it used to read as −1.8e5."""
    direction = np.random.default_rng(5).normal(size=16).astype(np.float32)
    scales = np.linspace(0.5, 2.0, 12, dtype=np.float32)[:, None]
    got = metrics.retrieval_metrics(
        scales * direction, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], k_max=5
    )
    assert math.isnan(got["CCDR"])
    # One distinct class keeps the ratio defined for its own queries, and non-negative.
    emb = scales * direction
    emb[:3] = np.random.default_rng(6).normal(size=(3, 16))
    got = metrics.retrieval_metrics(emb, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], k_max=5)
    assert math.isfinite(got["CCDR"]) and got["CCDR"] >= 0


@pytest.mark.parametrize(
    "emb, labels, message",
    [
        (np.zeros((3, 2)), [0, 1], "3 embeddings but 2 labels"),
        (np.zeros((1, 2)), [0], "at least 2"),
        (np.zeros(4), [0, 1, 2, 3], r"\[N, D\]"),
        (np.array([[0.0, np.nan], [1.0, 0.0]]), [0, 0], "NaN"),
    ],
)
def test_bad_input_raises_clear_error(emb, labels, message):
    with pytest.raises(ValueError, match=message):
        metrics.retrieval_metrics(emb, labels)


def test_unknown_metric_raises():
    with pytest.raises(ValueError, match="unknown metric 'cosin'"):
        metrics.retrieval_metrics(np.eye(3), [0, 0, 1], metric="cosin")


# --- in-batch DTkAP (jitted, padded) -------------------------------------------------

batch_dtkap = jax.jit(metrics.batch_dtkap, static_argnames=("k", "metric"))


def test_batch_dtkap_matches_reference_and_ignores_padding(gaussian_data):
    emb, labels = gaussian_data
    emb, labels = emb[:20], labels[:20].copy()
    ref = ref_metrics(emb.tolist(), labels.tolist(), 5, "cosine")["DTkAP"][4]
    # Padding rows copy real embeddings (they would rank first if not excluded).
    padded_emb = np.concatenate([emb, emb[:4], emb[4:6]])
    padded_labels = np.concatenate([labels, [-1] * 4, labels[4:6]])
    mask = np.array([True] * 24 + [False] * 2)
    got = batch_dtkap(
        jnp.asarray(padded_emb), jnp.asarray(padded_labels), k=5, mask=jnp.asarray(mask)
    )
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_batch_dtkap_is_zero_without_class_mates():
    labels = np.arange(26)
    labels[3] = -1
    labels[5] = 3  # a class-mate of a padding row only
    got = batch_dtkap(jnp.ones((26, 6)), jnp.asarray(labels), k=5, mask=jnp.ones(26, bool))
    assert float(got) == 0.0


# --- helpers ------------------------------------------------------------------------


def test_arccos_degrees_is_accurate():
    cos = np.concatenate([np.linspace(-1.0, 1.0, 200_001), [-1.0, -0.0, 0.0, 1.0]])
    got = np.asarray(distances.arccos_degrees(jnp.asarray(cos, jnp.float32)), np.float64)
    exact = np.degrees(np.arccos(cos.astype(np.float32).astype(np.float64)))
    assert np.max(np.abs(got - exact)) < 1e-3


# --- paired bootstrap over individuals ----------------------------------------------


def test_paired_bootstrap_of_a_constant_gain_is_that_gain():
    b = np.random.default_rng(5).uniform(size=40)
    got = metrics.paired_bootstrap(b + 0.1, b, np.repeat(np.arange(8), 5))
    assert got["diff"] == pytest.approx(0.1) and got["low"] == pytest.approx(0.1)
    assert got["high"] == pytest.approx(0.1) and got["p_not_better"] == 0.0 and got["groups"] == 8


def test_paired_bootstrap_resamples_individuals_not_queries():
    """Two individuals, one +1 and one −1 on all ten of its queries: resampled by query the
    interval would hug 0; by individual the resamples are −1, 0 or +1, with P(≤ 0) = 3/4."""
    a = np.r_[np.ones(10), -np.ones(10)]
    got = metrics.paired_bootstrap(a, np.zeros(20), ["A"] * 10 + ["B"] * 10, samples=4000, seed=1)
    assert got["diff"] == 0.0 and got["low"] == -1.0 and got["high"] == 1.0
    assert got["p_not_better"] == pytest.approx(0.75, abs=0.03)


def test_paired_bootstrap_weights_queries_equally():
    """One query of +1 beside three of 0: the mean is 0.25, as a DTkAP mean would be."""
    got = metrics.paired_bootstrap([1.0, 0.0, 0.0, 0.0], [0.0] * 4, ["x", "y", "y", "y"])
    assert got["diff"] == 0.25 and got["high"] == 1.0 and got["low"] == 0.0


@pytest.mark.parametrize(
    "a, b, groups", [([1.0], [1.0, 2.0], [0]), ([1.0, 2.0], [1.0, 2.0], [0]), ([], [], [])]
)
def test_paired_bootstrap_rejects_mismatched_input(a, b, groups):
    with pytest.raises(ValueError):
        metrics.paired_bootstrap(a, b, groups)
