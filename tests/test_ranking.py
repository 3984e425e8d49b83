"""ranking: the one top-k against a plain sort by (-score, index): ties, exclusions, blocks."""

import jax.numpy as jnp
import numpy as np
import pytest

from leopard_jax import ranking


def brute_force(queries, gallery, k, excluded):
    """Plain loops: exact float64 dot products (the small integers below make them exact in
    float32 too), sorted by (-score, gallery index)."""
    out_idx, out_score = [], []
    for i, q in enumerate(queries):
        scored = sorted(
            (-float(np.dot(q.astype(np.float64), g)), j)
            for j, g in enumerate(gallery)
            if not excluded[i, j]
        )[:k]
        out_idx.append([j for _, j in scored] + [-1] * (k - len(scored)))
        out_score.append([-s for s, _ in scored] + [-np.inf] * (k - len(scored)))
    return np.array(out_idx), np.array(out_score, np.float32)


@pytest.mark.parametrize("blocks", [(1024, 65536), (3, 4), (1, 1)])
def test_top_k_equals_a_plain_sort_with_ties_and_exclusions(blocks):
    rng = np.random.default_rng(0)
    queries = rng.integers(-2, 3, size=(9, 3)).astype(np.float32)  # many equal dot products
    gallery = rng.integers(-2, 3, size=(13, 3)).astype(np.float32)
    banned = rng.random((9, 13)) < 0.3
    banned[0] = True  # a query with nothing left: all slots empty
    indices, scores = ranking.top_k(
        queries,
        gallery,
        5,
        exclude=lambda q, g: banned[np.ix_(q, g)],
        query_block=blocks[0],
        gallery_block=blocks[1],
    )
    want_idx, want_score = brute_force(queries, gallery, 5, banned)
    np.testing.assert_array_equal(indices, want_idx)
    np.testing.assert_array_equal(scores, want_score)
    assert indices.dtype == np.int64 and scores.dtype == np.float32 and np.all(indices[0] == -1)


def test_same_row_excludes_self_and_k_beyond_the_gallery_pads():
    vectors = np.eye(3, dtype=np.float32)
    indices, scores = ranking.top_k(vectors, vectors, 4, exclude=ranking.same_row)
    assert indices.tolist() == [[1, 2, -1, -1], [0, 2, -1, -1], [0, 1, -1, -1]]
    assert np.all(scores[:, :2] == 0.0) and np.all(np.isneginf(scores[:, 2:]))


def test_best_k_ties_signed_zeros_and_marks_excluded():
    scores = jnp.array([[0.0, -0.0, 1.0, -jnp.inf], [-jnp.inf, -0.0, -jnp.inf, 0.0]])
    top, index = ranking.best_k(scores, 3)
    assert index.tolist() == [[2, 0, 1], [1, 3, -1]]  # -0.0 ties +0.0: lower column first
    assert top[1, 2] == -jnp.inf


def test_empty_inputs_and_bad_shapes():
    indices, scores = ranking.top_k(np.zeros((2, 3)), np.zeros((0, 3)), 2)
    assert indices.tolist() == [[-1, -1]] * 2 and np.all(np.isneginf(scores))
    with pytest.raises(ValueError, match="queries are 4-d, gallery rows 3-d"):
        ranking.top_k(np.ones((1, 4)), np.ones((2, 3)), 1)
    with pytest.raises(ValueError, match="k must be at least 1"):
        ranking.top_k(np.ones((1, 3)), np.ones((2, 3)), 0)
