"""export: the ONNX file computes the JAX embed path's embeddings (ONNX Runtime vs
`inference.embed_images`), with a dynamic batch, grouped depthwise convolutions, the input
contract in its metadata, and one-line errors on bad input."""

from __future__ import annotations

import json

import jax
import numpy as np
import onnx
import pytest
from test_embed import HEIGHT, WIDTH, random_variables

from leopard_jax import embed, export, inference, model_io
from leopard_jax.models.embedding import EmbeddingModel

BACKBONE, DIMS = "efficientnetv2_b0", 16  # has depthwise convolutions; resnet18 has none


def mild_random_variables(model, shape, seed: int):
    """Seeded random weights with batch-norm statistics near their defaults: a random deep
    net with strongly perturbed statistics is so ill-conditioned that float32 rounding
    alone (any two correct implementations) differs by more than 1e-4."""
    return random_variables(model, shape, seed, kernel_gain=1.0, var_spread=0.1, noise=0.05)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(workdir, variables, .onnx path): a tiny random model saved as a workdir's best
    model and exported through the command."""
    root = tmp_path_factory.mktemp("export")
    model = EmbeddingModel(BACKBONE, dims=DIMS)
    variables = mild_random_variables(model, (1, HEIGHT, WIDTH, 4), seed=3)
    description = {
        "model": {"backbone": BACKBONE, "head": "pooled", "dims": DIMS, "in_chans": 4},
        "input": {"height": HEIGHT, "width": WIDTH, "channels": 4},
        "info": {"source": "test", "step": 7},
    }
    workdir = root / "run"
    model_io.save_model(workdir / model_io.WORKDIR_BEST, variables, description)
    out = root / "model.onnx"
    assert export.main(["--checkpoint", str(workdir), "--out", str(out)]) == 0
    return workdir, variables, out


def test_onnx_runtime_matches_the_jax_embed_path(exported):
    workdir, variables, path = exported
    images = list(np.random.default_rng(0).integers(0, 256, (5, HEIGHT, WIDTH, 4), np.uint8))
    model = model_io.build_model(model_io.read_description(workdir))
    want = inference.embed_images(model, variables, images, batch_size=2)
    session, meta = export.load(path)
    got = inference.embed_images_onnx(session, images, batch_size=2)  # batches 2, 2, 1

    assert got.shape == want.shape == (5, DIMS) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.min(np.sum(got * want, axis=1)) >= 0.99999
    # one batch of all five gives the same rows: the batch axis is dynamic
    one_batch = inference.embed_images_onnx(session, images, batch_size=8)
    np.testing.assert_allclose(one_batch, got, atol=1e-5)
    assert len(inference.embed_images_onnx(session, [], batch_size=2)) == 0


def test_the_file_states_its_input_and_holds_convolutions_as_convs(exported):
    _, variables, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    (graph_input,) = proto.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == export.INPUT
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [HEIGHT, WIDTH, 4]

    groups = [
        a.i
        for n in proto.graph.node
        if n.op_type == "Conv"
        for a in n.attribute
        if a.name == "group"
    ]
    depthwise = [
        leaf.shape[-1]
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
        if "conv_dw" in jax.tree_util.keystr(path)
    ]
    # each depthwise layer is one grouped Conv (group = its channels), not k·k slices
    assert len(depthwise) == 16  # b0: 3 + 5 + 8 MBConv blocks
    assert sorted(g for g in groups if g > 1) == sorted(depthwise)
    assert not any(n.op_type == "Slice" for n in proto.graph.node)
    # every convolution kernel of the backbone, 1x1 ones included, is one ONNX Conv (which
    # ONNX Runtime fuses with its batch norm), not an Einsum/MatMul between Transposes
    kernels = [
        leaf
        for leaf in jax.tree_util.tree_leaves(variables["params"]["backbone"])
        if leaf.ndim == 4
    ]
    assert sum(k.shape[:2] == (1, 1) for k in kernels) > 16
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == len(kernels)
    assert not any(n.op_type in ("Einsum", "MatMul") for n in proto.graph.node)
    # every batch norm is one BatchNormalization, which ONNX Runtime folds into its Conv,
    # not the Sub/Mul/Sqrt/Add it is computed with (those stay as ops: 1.2x the reference
    # against 1.4-1.6x for B2 in the bench)
    norms = [leaf for leaf in jax.tree_util.tree_leaves(variables["batch_stats"]) if leaf.ndim]
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == len(norms) // 2
    assert not any(n.op_type in ("Sqrt", "Sub") for n in proto.graph.node)

    meta = export.read_metadata(proto)
    contract = export.input_contract(meta)
    assert contract["layout"] == "NHWC" and contract["dtype"] == "uint8"
    assert (contract["height"], contract["width"], contract["channels"]) == (HEIGHT, WIDTH, 4)
    assert contract["channel_order"] == "R,G,B,edge"
    assert meta[export.META_PREFIX + "model_fingerprint"] == embed.fingerprint(variables)
    assert export.description_of(meta)["model"]["backbone"] == BACKBONE
    assert json.loads(meta[export.META_PREFIX + "output"])["name"] == export.OUTPUT


def test_bad_input_is_a_one_line_error(tmp_path, exported, capsys):
    workdir, _, onnx_path = exported
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    cases = [
        (unfinished, tmp_path / "m.onnx", "without best_model/"),
        (tmp_path / "nope", tmp_path / "m.onnx", "no model.json"),
        (workdir, tmp_path / "missing" / "m.onnx", "does not exist; create it first"),
        (workdir, tmp_path, "is a directory"),
    ]
    for checkpoint, out, message in cases:
        assert export.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "m.onnx").exists()


def test_loading_a_foreign_onnx_file_names_the_fix(tmp_path):
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node],
        "foreign",
        [value("x", onnx.TensorProto.FLOAT, [1])],
        [value("y", onnx.TensorProto.FLOAT, [1])],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    with pytest.raises(export.ExportError, match="no leopard_jax metadata.*leopard_jax.export"):
        export.load(foreign)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(export.ExportError, match="not a readable ONNX model"):
        export.load(tmp_path / "junk.onnx")
    with pytest.raises(export.ExportError, match="no such ONNX file"):
        export.load(tmp_path / "absent.onnx")


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), "SAME", "VALID"])
def test_max_pool_for_the_export_is_flax_max_pool(padding):
    from flax import linen as nn

    x = np.random.default_rng(1).normal(size=(2, 9, 12, 3)).astype(np.float32)
    want = nn.max_pool(x, (3, 3), strides=(2, 2), padding=padding)
    np.testing.assert_array_equal(export.max_pool(x, (3, 3), (2, 2), padding), want)
