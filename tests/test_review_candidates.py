"""Candidate selection: top-k by cosine, skipping the anchor's individual (transitively)."""

import json

import numpy as np
import pytest

from leopard_jax import embeddings_io
from leopard_jax.review import candidates as cand_lib
from leopard_jax.review import store as store_lib

N = 12


def _write_npz(path, n=N, dims=6, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dims))
    arrays = {
        "embeddings": (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32),
        "keys": np.array([f"k{i:02d}" for i in range(n)]),
        "meta": np.array(json.dumps({"model": "test"})),
    }
    for name in ("paths", "identities", "flanks", "crops", "edges"):
        arrays[name] = np.array([f"{name}{i}" for i in range(n)])
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return cand_lib.load_catalog(_write_npz(tmp_path_factory.mktemp("cat") / "e.npz"))


def _graph(links=(), not_same=(), reviewed=()):
    decisions = [
        store_lib.Decision(i, "match", a, b, None, "", None) for i, (a, b) in enumerate(links)
    ]
    decisions += [
        store_lib.Decision(100 + i, "no_match", a, b, None, "", None)
        for i, (a, b) in enumerate(not_same)
    ]
    decisions += [
        store_lib.Decision(200 + i, "reviewed", a, None, None, "", None)
        for i, a in enumerate(reviewed)
    ]
    return store_lib.build_graph(decisions)


def _brute_force(catalog, anchor, skip, k=5):
    """Reference: plain loops over rows, cosine from scratch."""
    e = catalog.embeddings
    scored = []
    for r in range(len(catalog)):
        if r == anchor or catalog.keys[r] in skip:
            continue
        cos = sum(float(e[anchor, d]) * float(e[r, d]) for d in range(e.shape[1]))
        scored.append((-cos, r))
    return [r for _, r in sorted(scored)[:k]]


def test_loading_keeps_unit_norm_and_order(catalog):
    np.testing.assert_allclose(np.linalg.norm(catalog.embeddings, axis=1), 1.0, rtol=1e-6)
    assert (
        catalog.keys[3] == "k03" and catalog.index["k03"] == 3 and catalog.meta == {"model": "test"}
    )


def test_top_candidates_match_brute_force_without_decisions(catalog):
    for anchor in range(len(catalog)):
        got = cand_lib.top_candidates(catalog, _graph(), anchor)
        assert [r for r, _ in got] == _brute_force(catalog, anchor, set())
        scores = [s for _, s in got]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(
            scores[0], catalog.embeddings[anchor] @ catalog.embeddings[got[0][0]], rtol=1e-6
        )


def test_transitively_linked_candidates_are_skipped(catalog):
    # k00-k05 directly, k05-k07 and k07-k09: k07 and k09 join k00 only through other links.
    graph = _graph(links=[("k00", "k05"), ("k05", "k07"), ("k09", "k07")])
    got = [r for r, _ in cand_lib.top_candidates(catalog, graph, 0)]
    assert got == _brute_force(catalog, 0, {"k05", "k07", "k09"})
    assert not {5, 7, 9} & set(got)
    assert sorted(r for r, _ in cand_lib.same_individual(catalog, graph, 0)) == [5, 7, 9]
    # The same holds from the other end of the chain.
    assert 0 not in [r for r, _ in cand_lib.top_candidates(catalog, graph, 9)]


def test_not_same_rules_out_the_whole_other_individual(catalog):
    graph = _graph(links=[("k03", "k04")], not_same=[("k00", "k03")])
    got = [r for r, _ in cand_lib.top_candidates(catalog, graph, 0)]
    assert got == _brute_force(catalog, 0, {"k03", "k04"})
    # ... but only for the anchor's individual: k01 may still be asked about k03.
    assert 3 in [r for r, _ in cand_lib.top_candidates(catalog, graph, 1, k=N)]


def test_fewer_candidates_when_few_remain(catalog):
    graph = _graph(links=[(f"k{i:02d}", f"k{i + 1:02d}") for i in range(N - 3)])
    assert [r for r, _ in cand_lib.top_candidates(catalog, graph, 0)] == _brute_force(
        catalog, 0, {f"k{i:02d}" for i in range(N - 2)}
    )
    assert len(cand_lib.top_candidates(catalog, graph, 0)) == 2


def test_next_unreviewed_wraps_and_ends(catalog):
    assert cand_lib.next_unreviewed(catalog, _graph()) == 0
    assert cand_lib.next_unreviewed(catalog, _graph(reviewed=["k00", "k01"])) == 2
    assert cand_lib.next_unreviewed(catalog, _graph(reviewed=["k00", "k05"]), after=N - 1) == 1
    assert cand_lib.next_unreviewed(catalog, _graph(reviewed=catalog.keys)) is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"keys": None}, "lacks keys"),
        ({"keys": np.array(["a"] * N)}, "key 'a' appears at rows 0 and 1"),
        ({"keys": np.array([f"k{i}" if i else "" for i in range(N)])}, r"keys\[0\] is empty"),
        ({"crops": np.array(["c"] * (N - 1))}, "'crops' has shape"),
        ({"embeddings": np.zeros((N, 4), np.float32)}, "zero or non-finite"),
        ({"embeddings": np.full((N, 6), 2.0, np.float32)}, "not unit norm"),
        (
            {
                "embeddings": np.zeros((0, 6), np.float32),
                **{f: np.array([], str) for f in embeddings_io.STRING_FIELDS},
            },
            "holds no images",
        ),
        ({"keys": np.array([f"k{i}" for i in range(N)], dtype=object)}, "not a readable .npz"),
    ],
)
def test_bad_embeddings_files_are_explained(tmp_path, overrides, message):
    path = _write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(embeddings_io.EmbeddingsFileError, match=message) as info:
        cand_lib.load_catalog(path)
    assert "bad.npz" in str(info.value) and "leopard_jax.embed" in str(
        info.value
    )  # the file and the fix


def test_missing_and_corrupt_files_are_explained(tmp_path):
    with pytest.raises(embeddings_io.EmbeddingsFileError, match="nope.npz: not found"):
        cand_lib.load_catalog(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(embeddings_io.EmbeddingsFileError, match="junk.npz: not a readable .npz"):
        cand_lib.load_catalog(tmp_path / "junk.npz")
