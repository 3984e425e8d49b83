"""Losses against hand-written numpy references, finite differences and edge cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leopard_jax import losses

B, C, D = 12, 5, 8

# Jitted once per module: eager op-by-op dispatch compiles every primitive separately.
cosface = jax.jit(losses.cosface_loss, static_argnames=("scale", "margin", "margin_fn"))
arcface = jax.jit(losses.arcface_loss, static_argnames=("scale", "margin"))
triplet = jax.jit(losses.triplet_loss, static_argnames=("margin", "fallback_to_random"))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(B, D)).astype(np.float32)
    centers = rng.normal(size=(C, D)).astype(np.float32)
    labels = rng.integers(0, C, size=B)
    labels[-2:] = -1  # padding
    return emb, centers, labels


# --- references (numpy, per sample) --------------------------------------------------


def ref_margin_softmax(emb, centers, labels, scale, true_logit):
    total, count = 0.0, 0
    for x, y in zip(emb.astype(np.float64), labels):
        if y < 0:
            continue
        cos = [
            float(np.dot(x, c) / (np.linalg.norm(x) * np.linalg.norm(c)))
            for c in centers.astype(np.float64)
        ]
        logits = [scale * (true_logit(cj) if j == y else cj) for j, cj in enumerate(cos)]
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[y]
        count += 1
    return total / count if count else 0.0


def ref_adaptive_h(cos):
    return ((1 - cos**2) ** 4 + 0.1) / 1.1


def ref_arcface_true(cos, m):
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return math.cos(theta + m) if theta + m <= math.pi else cos - m * math.sin(m)


# --- CosFace / ArcFace values --------------------------------------------------------


@pytest.mark.parametrize(
    "margin_fn, h", [("constant", lambda c: 1.0), ("adaptive", ref_adaptive_h)]
)
def test_cosface_matches_reference(batch, margin_fn, h):
    emb, centers, labels = batch
    loss, aux = cosface(emb, centers, labels, scale=30.0, margin=0.35, margin_fn=margin_fn)
    ref = ref_margin_softmax(emb, centers, labels, 30.0, lambda c: c - 0.35 * h(c))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert aux["logits"].shape == (B, C) and aux["cos_true"].shape == (B,)
    assert int(aux["num_valid"]) == B - 2


def test_arcface_matches_reference(batch):
    emb, centers, labels = batch
    loss, _ = arcface(emb, centers, labels, scale=30.0, margin=0.5)
    ref = ref_margin_softmax(emb, centers, labels, 30.0, lambda c: ref_arcface_true(c, 0.5))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_arcface_true_logit_keeps_falling_past_pi_minus_m():
    cos = np.cos(np.linspace(0.0, math.pi, 2001)).astype(np.float32)
    got = np.asarray(jax.jit(losses.arcface_true_logit)(cos, 0.5))
    ref = [ref_arcface_true(float(c), 0.5) for c in cos]
    np.testing.assert_allclose(got, ref, atol=2e-6)
    assert np.all(np.diff(got) <= 1e-6)  # no reward for a worse angle


def test_adaptive_margin_equals_constant_where_h_is_one(batch):
    """h(0) = 1: with every embedding orthogonal to its own centre both losses agree,
    while elsewhere they differ (so the comparison can fail)."""
    emb, centers, labels = batch
    c_true = centers[np.maximum(labels, 0)]
    c_unit = c_true / np.linalg.norm(c_true, axis=1, keepdims=True)
    ortho = emb - np.sum(emb * c_unit, axis=1, keepdims=True) * c_unit
    adaptive, _ = cosface(ortho, centers, labels, margin_fn="adaptive")
    constant, aux = cosface(ortho, centers, labels, margin_fn="constant")
    assert np.max(np.abs(aux["cos_true"])) < 1e-6
    np.testing.assert_allclose(adaptive, constant, rtol=1e-5)
    adaptive, _ = cosface(emb, centers, labels, margin_fn="adaptive")
    constant, _ = cosface(emb, centers, labels, margin_fn="constant")
    assert abs(float(adaptive) - float(constant)) > 1e-3


def test_custom_margin_function_of_ones_is_original_cosface(batch):
    emb, centers, labels = batch
    custom, _ = cosface(emb, centers, labels, margin_fn=jnp.ones_like)
    constant, _ = cosface(emb, centers, labels, margin_fn="constant")
    assert float(custom) == float(constant)


def test_margin_functions_shape():
    cos = jnp.linspace(-1.0, 1.0, 201)
    h = losses.MARGIN_FUNCTIONS["adaptive"](cos)
    assert float(h[100]) == pytest.approx(1.0)  # orthogonal: full margin
    assert float(h[0]) == float(h[-1]) == pytest.approx(0.1 / 1.1)
    assert float(jnp.max(h)) == pytest.approx(1.0)


def test_unknown_margin_function_raises(batch):
    emb, centers, labels = batch
    with pytest.raises(ValueError, match="unknown margin_fn 'adaptiv'"):
        losses.cosface_loss(emb, centers, labels, margin_fn="adaptiv")


def test_all_padding_gives_zero_loss_and_zero_gradient(batch):
    emb, centers, _ = batch
    labels = -np.ones(B, int)
    loss, grad = jax.jit(jax.value_and_grad(lambda e: losses.cosface_loss(e, centers, labels)[0]))(
        emb
    )
    assert float(loss) == 0.0 and float(jnp.max(jnp.abs(grad))) == 0.0


# --- gradients -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda e, c, y: losses.cosface_loss(e, c, y, margin_fn="adaptive")[0],
        lambda e, c, y: losses.cosface_loss(e, c, y, margin_fn="constant")[0],
        lambda e, c, y: losses.arcface_loss(e, c, y)[0],
    ],
    ids=["cosface_adaptive", "cosface_constant", "arcface"],
)
def test_gradient_matches_finite_differences(batch, loss_fn):
    """Directional derivatives in float64 (x64 enabled only inside this test)."""
    emb, centers, labels = batch
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        e = jnp.asarray(emb, jnp.float64)
        c = jnp.asarray(centers, jnp.float64)
        y = jnp.asarray(labels)
        loss_fn = jax.jit(loss_fn)
        grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(e, c, y)
        for _ in range(3):
            ve = jnp.asarray(rng.normal(size=e.shape))
            vc = jnp.asarray(rng.normal(size=c.shape))
            analytic = float(jnp.sum(grads[0] * ve) + jnp.sum(grads[1] * vc))
            eps = 1e-6
            numeric = (
                float(loss_fn(e + eps * ve, c + eps * vc, y))
                - float(loss_fn(e - eps * ve, c - eps * vc, y))
            ) / (2 * eps)
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    assert jnp.ones(1).dtype == jnp.float32  # x64 did not leak


@pytest.mark.parametrize("loss_name", ["cosface", "arcface"])
def test_gradients_finite_at_cos_plus_minus_one_and_zero_norm(batch, loss_name):
    _, centers, _ = batch
    emb = np.stack([centers[0], -centers[1], np.zeros(D, np.float32), centers[2] * 3.0])
    labels = np.array([0, 1, 2, 2])
    centers = centers.copy()
    centers[4] = 0.0  # a zero-norm class centre too
    loss_fn = {"cosface": losses.cosface_loss, "arcface": losses.arcface_loss}[loss_name]
    value_and_grad = jax.jit(
        jax.value_and_grad(lambda e, c: loss_fn(e, c, labels), argnums=(0, 1), has_aux=True)
    )
    (_, aux), grads = value_and_grad(emb, centers)
    cos_true = aux["cos_true"]
    np.testing.assert_allclose(cos_true, [1.0, -1.0, 0.0, 1.0], atol=1e-6)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


# --- jit equals no jit ---------------------------------------------------------------


def test_jit_equals_no_jit(batch):
    emb, centers, labels = batch
    eager, eager_aux = losses.cosface_loss(emb, centers, labels)
    jitted, jitted_aux = cosface(emb, centers, labels)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    for name in eager_aux:
        np.testing.assert_allclose(jitted_aux[name], eager_aux[name], rtol=1e-5, atol=1e-5)


# --- triplet loss --------------------------------------------------------------------


@pytest.fixture(scope="module")
def triplet_batch():
    rng = np.random.default_rng(4)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, -1])
    emb = rng.normal(size=(len(labels), 3)).astype(np.float32) * 0.5
    return emb, labels


def ref_pairs(emb, labels, margin, semi_hard):
    """(anchor, positive) -> admissible negatives, with plain loops."""
    n = len(labels)
    dist = lambda i, j: float(np.linalg.norm(emb[i].astype(np.float64) - emb[j]))  # noqa
    out = {}
    for a in range(n):
        for p in range(n):
            if a == p or labels[a] < 0 or labels[a] != labels[p]:
                continue
            negatives = [k for k in range(n) if labels[k] >= 0 and labels[k] != labels[a]]
            if semi_hard:
                negatives = [k for k in negatives if dist(a, p) < dist(a, k) < dist(a, p) + margin]
            out[(a, p)] = negatives
    return out, dist


@pytest.mark.parametrize("semi_hard", [False, True])
def test_triplet_choices_and_loss_follow_reference(triplet_batch, semi_hard):
    emb, labels = triplet_batch
    margin = 0.4
    loss, aux = triplet(
        emb, labels, jax.random.key(0), margin=margin, semi_hard=jnp.asarray(semi_hard)
    )
    admissible, dist = ref_pairs(emb, labels, margin, semi_hard)
    chosen = np.asarray(aux["negative_index"])
    used = [(a, p) for (a, p), negs in admissible.items() if negs]
    assert 0 < len(used) < len(admissible) or not semi_hard
    assert int(aux["num_triplets"]) == len(used)
    assert int(aux["num_pairs"]) == len(admissible)
    total = 0.0
    for (a, p), negs in admissible.items():
        if negs:
            assert chosen[a, p] in negs
            total += max(dist(a, p) - dist(a, chosen[a, p]) + margin, 0.0)
        else:
            assert chosen[a, p] == -1
    np.testing.assert_allclose(loss, total / len(used), rtol=1e-5)


def test_semi_hard_switch_is_traced_not_recompiled(triplet_batch):
    emb, labels = triplet_batch

    def count(s):
        loss = triplet(emb, labels, jax.random.key(0), margin=0.4, semi_hard=jnp.asarray(s))
        return int(loss[1]["num_triplets"])

    warm_up = count(False)
    cache_size = triplet._cache_size()
    assert warm_up > count(True)
    assert triplet._cache_size() == cache_size


@jax.jit
def draw_negatives(keys, semi_hard):
    """The negative drawn for (anchor 0, positive 1) with each key. Positive at
    distance 1; negatives at 1.1, 1.2, 1.35 (semi-hard for α = 0.5) and 3.0 (too far)."""
    emb = jnp.array([[0.0], [1.0], [1.1], [1.2], [1.35], [3.0]])
    labels = jnp.array([0, 0, 1, 2, 3, 4])

    def draw(k):
        _, aux = losses.triplet_loss(emb, labels, k, margin=0.5, semi_hard=semi_hard)
        return aux["negative_index"][0, 1]

    return jax.vmap(draw)(keys)


def test_semi_hard_negatives_drawn_proportional_to_inverse_distance():
    draws = draw_negatives(jax.random.split(jax.random.key(5), 6000), True)
    counts = np.bincount(np.asarray(draws), minlength=6)
    weights = np.array([0, 0, 1 / 1.1, 1 / 1.2, 1 / 1.35, 0])
    expected = 6000 * weights / weights.sum()
    assert counts[5] == 0 and counts[0] == counts[1] == 0
    np.testing.assert_allclose(counts[2:5], expected[2:5], rtol=0.08)


def test_warm_up_negatives_are_uniform():
    draws = draw_negatives(jax.random.split(jax.random.key(6), 6000), False)
    counts = np.bincount(np.asarray(draws), minlength=6)
    np.testing.assert_allclose(counts[2:], 1500, rtol=0.1)


def test_fallback_to_random_uses_every_pair(triplet_batch):
    emb, labels = triplet_batch
    _, aux = triplet(
        emb, labels, jax.random.key(0), margin=0.4, semi_hard=True, fallback_to_random=True
    )
    assert int(aux["num_triplets"]) == int(aux["num_pairs"])


@jax.jit
def triplet_value_and_grad(emb, labels, semi_hard):
    return jax.value_and_grad(
        lambda e: losses.triplet_loss(
            e, labels, jax.random.key(0), margin=0.2, semi_hard=semi_hard
        ),
        has_aux=True,
    )(emb)


@pytest.mark.parametrize(
    "labels, semi_hard",
    [
        ([0, 0, 0, 0], False),  # no negative at all
        ([0, 1, 2, 3], False),  # no positive pair
        ([-1, -1, -1, -1], True),  # all padding
        ([0, 0, 1, 1], True),  # negatives exist but none is semi-hard
    ],
)
def test_triplet_loss_is_exactly_zero_when_no_triplet_is_used(labels, semi_hard):
    # Duplicate embeddings (d = 0) also exercise the sqrt at zero.
    emb = jnp.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [5.0, 0.0]])
    (loss, aux), grad = triplet_value_and_grad(emb, jnp.array(labels), jnp.asarray(semi_hard))
    assert int(aux["num_triplets"]) == 0
    assert float(loss) == 0.0 and not math.isnan(float(loss))
    assert float(jnp.max(jnp.abs(grad))) == 0.0


def test_triplet_gradient_finite_with_duplicate_embeddings():
    emb = jnp.array([[0.0, 0.0], [0.0, 0.0], [0.1, 0.0], [0.0, 0.0]])
    labels = jnp.array([0, 0, 1, 1])
    (_, aux), grad = triplet_value_and_grad(emb, labels, jnp.asarray(False))
    assert int(aux["num_triplets"]) == 4
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_registry_entries_call_their_loss_with_the_config_values(batch):
    """losses.LOSSES is what training and config validation read by config.loss.name."""
    import types

    emb, centers, labels = batch
    c = types.SimpleNamespace(scale=16.0, margin=0.3, margin_fn="spotid_code")
    direct = {
        "cosface": cosface(emb, centers, labels, scale=16.0, margin=0.3, margin_fn="spotid_code"),
        "arcface": arcface(emb, centers, labels, scale=16.0, margin=0.3),
    }
    for name, (expected, _) in direct.items():
        loss, used = losses.LOSSES[name].fn(c, emb, centers, labels, None, 0)
        np.testing.assert_allclose(loss, expected, rtol=1e-6)
        assert int(used) == int(np.sum(labels >= 0))
    assert {n for n, entry in losses.LOSSES.items() if entry.uses_centers} == {"cosface", "arcface"}
    assert {entry.metric for entry in losses.LOSSES.values()} <= {"cosine", "euclidean"}
