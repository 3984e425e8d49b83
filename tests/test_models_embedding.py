"""EmbeddingModel and build_backbone contracts: shapes, unit norm, parameter layout, bf16
compute on fp32 parameters, stochastic depth in training, name handling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leopard_jax.models import build_backbone, canonical_name
from leopard_jax.models.embedding import EmbeddingModel

X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 48, 4)), jnp.float32)


@pytest.fixture(scope="module")
def fp32():
    model = EmbeddingModel("resnet18", dims=16)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), X))()
    return model, variables


def test_embeddings_are_float32_unit_norm(fp32):
    model, variables = fp32
    out = model.apply(variables, X, train=False)
    assert out.shape == (2, 16) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert set(variables["params"]) == {"backbone", "embedding"}
    assert variables["params"]["embedding"]["kernel"].shape == (
        512,
        16,
    )  # pooled head: 512 features


def test_bf16_computes_on_fp32_params_close_to_fp32(fp32):
    model, variables = fp32
    bf16 = EmbeddingModel("resnet18", dims=16, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: bf16.init(jax.random.PRNGKey(0), X))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    low = bf16.apply(variables, X, train=False)
    high = model.apply(variables, X, train=False)
    assert low.dtype == jnp.float32
    assert np.min(np.sum(np.asarray(low) * np.asarray(high), axis=1)) > 0.99  # cosine similarity


def test_training_uses_dropout_rng_and_updates_batch_stats():
    model = EmbeddingModel("resnet18", dims=8, drop_path_rate=0.5)
    variables = model.init(jax.random.PRNGKey(0), X)
    step = jax.jit(
        lambda v, rng: model.apply(v, X, train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    )
    (a, stats), (b, _) = (
        step(variables, jax.random.PRNGKey(1)),
        step(variables, jax.random.PRNGKey(2)),
    )
    assert not np.allclose(a, b)  # different samples dropped
    before, after = (
        variables["batch_stats"]["backbone"]["bn1"]["mean"],
        stats["batch_stats"]["backbone"]["bn1"]["mean"],
    )
    assert not np.allclose(before, after)
    np.testing.assert_allclose(
        model.apply(variables, X, train=False), model.apply(variables, X, train=False)
    )


def test_spotid_head_sits_on_1000_logits():
    shapes = jax.eval_shape(
        lambda: EmbeddingModel("tf_efficientnetv2_b0", head="spotid").init(jax.random.PRNGKey(0), X)
    )
    assert shapes["params"]["embedding"]["kernel"].shape == (1000, 1024)
    assert "classifier" in shapes["params"]["backbone"]


def test_feature_backbone_width_and_names():
    for name, width in [
        ("efficientnetv2_b0", 1280),
        ("efficientnetv2_b2", 1408),
        ("efficientnetv2_b3", 1536),
        ("resnet18", 512),
    ]:
        model = build_backbone(name, num_classes=0)
        assert model.num_features == width
    out = jax.eval_shape(
        lambda: build_backbone("resnet18", num_classes=0).init_with_output(
            jax.random.PRNGKey(0), X, train=False
        )
    )[0]
    assert out.shape == (2, 512)
    assert canonical_name("TF_EfficientNetV2_B2") == "efficientnetv2_b2"
    with pytest.raises(ValueError, match="efficientnetv2_b2.*resnet18"):
        build_backbone("efficientnetv2_b9")
    with pytest.raises(ValueError, match="head"):
        EmbeddingModel("resnet18", head="logits").init(jax.random.PRNGKey(0), X)
