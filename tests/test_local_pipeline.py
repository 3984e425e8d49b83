"""The local-feature pipeline end to end on a hand-made dataset: store build (resume,
missing store), `match --rerank local` with cross-fitted calibration, `evaluate --matches`,
and the calibrator's refusal of another model."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
from test_local_features import spots, warp

from leopard_jax import embeddings_io, evaluate, match
from leopard_jax.data import records
from leopard_jax.local import __main__ as local_cli
from leopard_jax.local import calibration, matching, rerank, store

INDIVIDUALS, PHOTOS = 4, 2


def write_dataset(root):
    """INDIVIDUALS animals x PHOTOS crops (the pattern, then a warped copy), in the
    dataset layout of `records`; the records themselves are not needed here."""
    records.save_settings(root, {"height": 64, "width": 128, "channels": 4})
    (root / "shards").mkdir()
    (root / "shards" / "s0.array_record").write_bytes(b"")
    rows = []
    for a in range(INDIVIDUALS):
        pattern = spots(10 + a)
        for p in range(PHOTOS):
            key = f"L{a}/p{p}"
            image = pattern if p == 0 else warp(pattern)[0]
            for folder in ("crops", "edges"):
                (root / folder / f"L{a}").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / folder / f"{key}.jpg"), image)
            rows.append(
                {
                    "key": key,
                    "identity": f"L{a}",
                    "crop": f"crops/{key}.jpg",
                    "edge": f"edges/{key}.jpg",
                    "shard": "s0",
                    "index": str(len(rows)),
                }
            )
    with open(root / "shards" / "s0.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=records.MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows({**dict.fromkeys(records.MANIFEST_FIELDS, ""), **r} for r in rows)
    return rows


def write_embeddings(path, dataset, rows, fingerprint="abc123"):
    """Deep embeddings that know nothing: random directions."""
    vectors = np.random.default_rng(0).normal(size=(len(rows), 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    data = embeddings_io.make(
        vectors,
        meta={"dataset": str(dataset), "model_fingerprint": fingerprint},
        keys=[r["key"] for r in rows],
        identities=[r["identity"] for r in rows],
        crops=[str(dataset / r["crop"]) for r in rows],
    )
    embeddings_io.write(path, data)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rows = write_dataset(root)
    embeddings = root.parent / "e.npz"
    write_embeddings(embeddings, root, rows)
    return root, rows, embeddings


def test_a_dataset_without_a_store_names_the_command_that_builds_it(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    rows = write_dataset(tmp_path / "d")
    write_embeddings(tmp_path / "e.npz", tmp_path / "d", rows)
    code = match.main(
        [
            "--embeddings",
            str(tmp_path / "e.npz"),
            "--rerank",
            "local",
            "--out",
            str(tmp_path / "m.csv"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"python -m leopard_jax.local --data {tmp_path / 'd'}" in err


def test_store_builds_resumes_and_reads_back(dataset, capsys):
    root, rows, _ = dataset
    assert local_cli.main(["--data", str(root), "--workers", "1", "--no-progress"]) == 0
    assert f"{len(rows)} crops extracted now" in capsys.readouterr().out
    assert local_cli.main(["--data", str(root), "--workers", "1", "--no-progress"]) == 0
    assert "0 crops extracted now" in capsys.readouterr().out
    features = store.load(root)
    assert len(features) == len(rows)
    xy, desc = features.get("L0/p0")
    assert 0 < len(xy) <= 500 and desc.shape == (len(xy), 128) and desc.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=2e-3)  # float16 store
    # other settings on the same store are refused, not mixed in
    assert local_cli.main(["--data", str(root), "--max-keypoints", "7", "--no-progress"]) == 2


def test_rerank_puts_the_same_animal_first_and_evaluate_scores_the_three_rankings(
    dataset, tmp_path, capsys
):
    root, rows, embeddings = dataset
    local_cli.main(["--data", str(root), "--workers", "1", "--no-progress"])
    out = tmp_path / "m.csv"
    assert (
        match.main(
            [
                "--embeddings",
                str(embeddings),
                "--rerank",
                "local",
                "--top-k",
                "all",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = list(csv.DictReader(open(out)))
    assert set(match.CSV_FIELDS + match.RERANK_FIELDS) == set(table[0])
    assert len(table) == len(rows) * (len(rows) - 1)
    first = [r for r in table if r["rank"] == "1"]
    assert all(r["match_identity"] == r["query_identity"] for r in first)
    assert all(int(r["local_inliers"]) >= 30 for r in first)
    # no model dir in the meta: the calibrator goes beside the embeddings
    saved = json.loads((embeddings.parent / "e_calibrator.json").read_text())
    assert saved["model_fingerprint"] == "abc123" and saved["pairs"] == len(table)
    assert saved["fusion"] in calibration.FUSIONS and set(saved["fusion_log_loss"]) == set(
        calibration.FUSIONS
    )

    assert (
        evaluate.main(
            [
                "--embeddings",
                str(embeddings),
                "--matches",
                str(out),
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["local"]["DT5AP"] == 1.0 and result["local"]["T1RMD"] == 1.0
    assert result["fused"]["T1RMD"] == 1.0
    assert set(result) >= {"deep", "local", "fused", "fused_minus_deep_DT5AP"}
    # the CSV's deep order over the whole gallery is the plain evaluation's ranking
    plain = evaluate.evaluate(embeddings_io.read(embeddings))
    for key in ("DT5AP", "T1RMD", "T5RMD"):
        assert result["deep"][key] == pytest.approx(plain[key], abs=1e-6)
    capsys.readouterr()

    # new queries against the gallery use the saved calibrator; another model's is refused
    other = tmp_path / "other.npz"
    write_embeddings(other, root, rows, fingerprint="zzz999")
    code = match.main(
        [
            "--embeddings",
            str(other),
            "--query",
            str(embeddings),
            "--rerank",
            "local",
            "--calibrator",
            str(calibration.default_path({}, embeddings)),
            "--out",
            str(tmp_path / "m2.csv"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "fitted for model abc123" in err


def test_calibration_recovers_a_logistic_law_and_ece_by_hand():
    rng = np.random.default_rng(0)
    deep = rng.uniform(-1, 1, 4000)
    inliers = rng.integers(0, 60, 4000)
    p_true = 1 / (1 + np.exp(-(3.0 * np.log1p(inliers) - 6.0)))
    same = rng.random(4000) < p_true
    weights = calibration.fit(deep, inliers, same)["weights"]["local"]
    np.testing.assert_allclose(weights, [3.0, -6.0], atol=0.5)
    # two bins: [0.1, 0.1] with 1 of 2 same (gap 0.4), [0.9] with 1 of 1 (gap 0.1)
    assert calibration.ece([0.1, 0.1, 0.9], [1, 0, 1]) == pytest.approx((2 * 0.4 + 0.1) / 3)


def test_cross_fit_never_scores_a_pair_with_a_calibrator_that_saw_its_individuals(monkeypatch):
    trained, scored = [], []
    real_fit, real_probabilities = calibration.fit, calibration.probabilities

    def fit_spy(deep, inliers, same, **kw):
        trained.append(deep.astype(int).tolist())
        return real_fit(deep, inliers, same, **kw)

    def probabilities_spy(calibrator, deep, inliers):
        scored.append(deep.astype(int).tolist())
        return real_probabilities(calibrator, deep, inliers)

    monkeypatch.setattr(calibration, "fit", fit_spy)
    monkeypatch.setattr(calibration, "probabilities", probabilities_spy)
    groups = np.repeat(np.arange(10), 6).astype(str)
    candidates = np.roll(groups, 3)
    deep = np.arange(60, dtype=float)  # each pair's id, to see which pairs trained
    out = calibration.cross_fit(
        deep,
        np.tile([40, 2, 1], 20),
        np.tile([True, False, False], 20),
        groups,
        candidate_groups=candidates,
        folds=5,
    )
    assert len(trained) == 5 and sorted(sum(scored, [])) == list(range(60))
    for fitted_on, applied_to in zip(trained, scored):
        seen = {groups[i] for i in fitted_on} | {candidates[i] for i in fitted_on}
        assert not seen & {groups[i] for i in applied_to}
    assert np.all((out["fused"] > 0) & (out["fused"] < 1))


def test_a_crop_without_keypoints_is_stored_and_matches_nothing(tmp_path):
    store.write_settings(tmp_path, {"max_keypoints": 5})
    none_xy, none_desc = np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
    two_desc = np.full((2, 128), 128**-0.5, np.float32)
    store.write_part(
        store.store_dir(tmp_path),
        "part-0",
        ["blank", "two", "blank2"],
        [none_xy, np.ones((2, 2), np.float32), none_xy],
        [none_desc, two_desc, none_desc],
    )
    features = store.load(tmp_path)
    assert [len(features.get(k)[0]) for k in ("blank", "two", "blank2")] == [0, 2, 0]
    found = matching.match_pairs([features.get("blank")], [features.get("two")])[0]
    assert (found.tentative, found.inliers) == (0, 0)


@pytest.fixture
def stored(dataset):
    """(root, rows, embeddings, {dataset: feature store}) with the store built."""
    root, rows, embeddings = dataset
    local_cli.main(["--data", str(root), "--workers", "1", "--no-progress"])
    data = embeddings_io.read(embeddings)
    return root, rows, data, rerank.stores_for(data)


def count_matched_pairs(monkeypatch) -> list[int]:
    """Route `matching.match_pairs` through a counter: the list gets each call's pair
    count."""
    real, matched = matching.match_pairs, []

    def counted(a_sets, b_sets, **kw):
        matched.append(len(a_sets))
        return real(a_sets, b_sets, **kw)

    monkeypatch.setattr(matching, "match_pairs", counted)
    return matched


def test_rerank_matches_each_pair_once_however_often_it_is_met(stored, monkeypatch):
    root, rows, data, features = stored
    n = len(rows)
    indices = np.array([[j for j in range(n) if j != i] for i in range(n)])  # all against all
    real, matched = matching.match_pairs, count_matched_pairs(monkeypatch)
    scores = rerank.pair_matches(data, data, indices, features)
    assert sum(matched) == n * (n - 1) // 2  # (a, b) and (b, a): one match
    full = np.zeros((n, n), int)
    np.put_along_axis(full, indices, scores, axis=1)
    np.testing.assert_array_equal(full, full.T)
    one = features[str(root)]
    direct = real([one.get(data.keys[0])], [one.get(data.keys[1])])[0].inliers
    assert full[0, 1] == direct >= 30  # L0/p0 against its warped copy, as matched directly


def expanded_reference(S: np.ndarray) -> np.ndarray:
    """`rerank.expand` over a whole symmetric score matrix, written as array operations:
    max(S[q, g], w * max over j of min(S[q, j], S[j, g])), j among q's EXPAND_NEIGHBOURS
    highest with S[q, j] >= EXPAND_MIN_INLIERS, j != g, q."""
    n = len(S)
    off = ~np.eye(n, dtype=bool)
    rank = np.argsort(np.argsort(-np.where(off, S, -1), axis=1, kind="stable"), axis=1)
    lends = (S >= rerank.EXPAND_MIN_INLIERS) & off & (rank < rerank.EXPAND_NEIGHBOURS)  # [q, j]
    through = np.minimum(S[:, :, None], S[None, :, :])  # [q, j, g]
    best = np.where(lends[:, :, None] & off[None, :, :], through, 0).max(axis=1)
    return np.maximum(S, rerank.EXPAND_WEIGHT * best)


def test_expansion_reaches_a_mate_through_a_strongly_verified_third_photo():
    # the cases below are written for these
    assert (rerank.EXPAND_MIN_INLIERS, rerank.EXPAND_WEIGHT, rerank.EXPAND_NEIGHBOURS) == (
        15,
        0.5,
        1,
    )
    S = np.array([[0, 40, 0, 4], [40, 0, 30, 10], [0, 30, 0, 14], [4, 10, 14, 0]])
    n = len(S)
    indices = np.array([[j for j in range(n) if j != q] for q in range(n)])
    inliers = np.take_along_axis(S, indices, axis=1)
    links = rerank.links(inliers, indices)
    # each row's strongest: 0 -> 1 (40), 1 -> 0 (40), 2 -> 1 (30); row 3's best (14) lends nothing
    assert links == {(1, 2), (1, 3), (0, 2), (0, 3), (1, 0)}
    scores = rerank.expand(inliers, indices, lambda j, g: int(S[j, g]))
    full = np.zeros((n, n))
    np.put_along_axis(full, indices, scores, axis=1)
    assert full[0, 2] == 15.0  # 0 and 2 share nothing, each verifies strongly with 1
    assert full[0, 3] == 5.0  # half of min(40, 10) beats its own 4
    assert full[3].tolist() == [4, 10, 14, 0]  # no strong candidate: its own scores
    np.testing.assert_array_equal(full, expanded_reference(S.astype(float)) * (1 - np.eye(n)))
    # only the strongest lends: 0's fourth-strongest candidate (20 inliers) reaches 5 alone
    S = np.zeros((6, 6), int)
    S[0, 1:5] = S[1:5, 0] = [50, 40, 30, 20]
    S[4, 5] = S[5, 4] = 100
    wide = np.array([[j for j in range(6) if j != q] for q in range(6)])
    pairs = np.take_along_axis(S, wide, axis=1)
    assert rerank.expand(pairs, wide, lambda j, g: int(S[j, g]))[0, 4] == 0  # via 4 only
    assert (4, 5) not in rerank.links(pairs[:1], wide[:1])
    S[1, 5] = S[5, 1] = 100
    assert rerank.expand(pairs, wide, lambda j, g: int(S[j, g]))[0, 4] == 25.0  # via 1
    # an empty slot stays empty and is never a link
    indices[0, 2], inliers[0, 2] = -1, -1
    assert rerank.expand(inliers, indices, lambda j, g: int(S[j, g]))[0, 2] == -1


def test_local_scores_match_the_links_the_run_has_not_met(stored, monkeypatch):
    root, rows, data, features = stored
    n = len(rows)
    # each photo's two candidates: its mate (a warped copy, strongly verified) and the
    # next individual's photo of the same number; the mate-to-that-photo pairs are met by
    # no query
    mate = [i ^ 1 for i in range(n)]
    other = [(i + 2) % n for i in range(n)]
    indices = np.array([[mate[i], other[i]] for i in range(n)])
    real, matched = matching.match_pairs, count_matched_pairs(monkeypatch)
    inliers, scores = rerank.local_scores(data, data, indices, features)
    assert np.all(inliers[:, 0] >= rerank.EXPAND_MIN_INLIERS)
    links = rerank.links(inliers, indices)
    met = {tuple(sorted((i, int(j)))) for i in range(n) for j in indices[i]}
    unmet = {tuple(sorted(link)) for link in links} - met
    assert unmet and sum(matched) == len(met) + len(unmet)  # the links too, once each
    one = features[str(root)]
    between = {
        (j, g): real([one.get(data.keys[j])], [one.get(data.keys[g])])[0].inliers for j, g in links
    }
    np.testing.assert_array_equal(
        scores, rerank.expand(inliers, indices, lambda j, g: between[(j, g)])
    )
