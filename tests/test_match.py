"""match: blocked top-k against a plain-loop brute force (with exact ties), self-exclusion
by record, and the CSV command."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from leopard_jax import embeddings_io, match


def integer_set(
    n: int, seed: int, prefix: str = "r", crop_root: str = "/data"
) -> embeddings_io.Embeddings:
    """Small-integer vectors: dot products are exact in float32 and tie often, so the
    tie rule (lower gallery index first) is tested, not left to rounding."""
    vectors = np.random.default_rng(seed).integers(-2, 3, size=(n, 4)).astype(np.float32)
    keys = [f"{prefix}{i}" for i in range(n)]
    return embeddings_io.make(
        vectors,
        keys=keys,
        paths=[f"/photos/{k}.jpg" for k in keys],
        identities=[f"id{i % 4}" for i in range(n)],
        flanks=[("left", "right", "")[i % 3] for i in range(n)],
        crops=[f"{crop_root}/crops/{k}.jpg" for k in keys],
    )


def brute_force(queries, gallery, k):
    out_idx, out_sim = [], []
    for i in range(len(queries)):
        candidates = []
        for j in range(len(gallery)):
            if queries.keys[i] == gallery.keys[j] and queries.crops[i] == gallery.crops[j]:
                continue
            sim = sum(
                float(a) * float(b) for a, b in zip(queries.embeddings[i], gallery.embeddings[j])
            )
            candidates.append((-sim, j))
        best = sorted(candidates)[:k]
        out_idx.append([j for _, j in best] + [-1] * (k - len(best)))
        out_sim.append([-s for s, _ in best] + [-np.inf] * (k - len(best)))
    return np.array(out_idx), np.array(out_sim, np.float32)


@pytest.mark.parametrize("blocks", [(1024, 65536), (3, 4), (1, 1)])
def test_self_matching_equals_brute_force(blocks):
    gallery = integer_set(23, seed=0)
    indices, sims = match.top_k(gallery, gallery, 6, query_block=blocks[0], gallery_block=blocks[1])
    want_idx, want_sim = brute_force(gallery, gallery, 6)
    np.testing.assert_array_equal(indices, want_idx)
    np.testing.assert_array_equal(sims, want_sim)
    assert not np.any(indices == np.arange(23)[:, None])  # never itself


def test_separate_query_excludes_only_the_same_record():
    gallery = integer_set(15, seed=1)
    same = embeddings_io.select(gallery, np.array([2, 7]))  # the same records
    other_dataset = integer_set(3, seed=2, crop_root="/other")  # keys r0..r2 again, other crops
    queries = embeddings_io.concat(same, other_dataset)
    indices, sims = match.top_k(queries, gallery, 4, query_block=2, gallery_block=5)
    want_idx, want_sim = brute_force(queries, gallery, 4)
    np.testing.assert_array_equal(indices, want_idx)
    np.testing.assert_array_equal(sims, want_sim)
    assert 2 not in indices[0] and 7 not in indices[1]
    # an equal key from another dataset is a different image: it may match
    assert np.isin(0, indices[2:]) or np.isin(1, indices[2:]) or np.isin(2, indices[2:])


def test_k_beyond_the_gallery_pads_with_no_match():
    gallery = integer_set(3, seed=3)
    indices, sims = match.top_k(gallery, gallery, 4)
    assert np.all(indices[:, 2:] == -1) and np.all(np.isneginf(sims[:, 2:]))
    assert np.all(indices[:, :2] >= 0)


def gaussian_set(n: int, seed: int) -> embeddings_io.Embeddings:
    """Unit vectors without near-ties, so float rounding cannot reorder the reference."""
    vectors = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    template = integer_set(n, seed)
    return embeddings_io.make(
        vectors, **{f: getattr(template, f) for f in embeddings_io.STRING_FIELDS}
    )


def test_command_writes_the_csv(tmp_path, capsys):
    gallery = gaussian_set(9, seed=4)
    embeddings_io.write(tmp_path / "g.npz", gallery)
    out = tmp_path / "m.csv"
    assert match.main(["--embeddings", str(tmp_path / "g.npz"), "--k", "3", "--out", str(out)]) == 0
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 27 and tuple(table[0]) == match.CSV_FIELDS
    want_idx, want_sim = brute_force(gallery, gallery, 3)
    for row in table:
        i, rank = int(row["query_key"][1:]), int(row["rank"])
        j = want_idx[i, rank - 1]
        assert row["match_key"] == gallery.keys[j] and row["match_path"] == gallery.paths[j]
        assert (
            row["query_identity"] == gallery.identities[i]
            and row["match_identity"] == gallery.identities[j]
        )
        assert row["query_flank"] == gallery.flanks[i] and row["match_flank"] == gallery.flanks[j]
        assert abs(float(row["similarity"]) - want_sim[i, rank - 1]) < 1e-5
    assert "9 queries" in capsys.readouterr().out

    query = embeddings_io.make(np.ones((1, 5), np.float32) / np.sqrt(5), keys=["q"])
    embeddings_io.write(tmp_path / "q.npz", query)
    assert (
        match.main(
            [
                "--embeddings",
                str(tmp_path / "g.npz"),
                "--query",
                str(tmp_path / "q.npz"),
                "--out",
                str(tmp_path / "bad.csv"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "5-d" in err and "4-d" in err and err.count("\n") == 1
    assert match.main(["--embeddings", str(tmp_path / "missing.npz"), "--out", str(out)]) == 2
    assert "missing.npz: not found" in capsys.readouterr().err
    assert not (tmp_path / "bad.csv").exists()


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        match.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{name}" in text for name in ("embeddings", "query", "k", "out"))


def test_top_k_all_ranks_the_whole_gallery_and_a_bad_value_is_refused(tmp_path, capsys):
    embeddings_io.write(tmp_path / "g.npz", gaussian_set(7, seed=5))
    args = ["--embeddings", str(tmp_path / "g.npz"), "--out", str(tmp_path / "m.csv")]
    assert match.main([*args, "--top-k", "all"]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "m.csv")))) == 7 * 6
    capsys.readouterr()
    assert match.main([*args, "--top-k", "none"]) == 2
    assert "--top-k='none'" in capsys.readouterr().err
