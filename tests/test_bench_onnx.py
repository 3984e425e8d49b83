"""scripts/bench_onnx.py at toy size: the `embed_onnx` part runs both sides, reports a ratio
in bench.py's result shape, and its ONNX embeddings match the JAX path and the reference."""

from __future__ import annotations

import importlib
import pathlib
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
bench = importlib.import_module("bench")
bench_onnx = importlib.import_module("bench_onnx")

CFG = bench.Config(
    batch=2, height=64, width=128, steps=1, rounds=1, backbone="resnet18", dims=64, num_classes=8
)


def test_embed_onnx_part_has_the_embed_parts_shape_and_agrees():
    bench.setup_devices(CFG)
    models = bench.build_models(CFG)
    result = bench_onnx.embed_onnx_part(CFG, models)
    assert result["part"] == "embed_onnx"
    assert result["same_computation"], result["refused_because"]
    assert result["ratio"] > 0
    assert result["first_embeddings_max_abs_diff"] < 2e-3
    assert result["onnx_vs_jax_max_abs_diff"] <= 1e-4
    assert result["onnx_vs_jax_min_cosine"] >= 0.99999
    for side in ("leopard_jax", "reference"):
        assert result[side]["images_per_s"] > 0 and result[side]["steps"] == 1
    assert "ONNX Runtime" in result["leopard_jax"]["reference"]
    assert "REFUSED" not in bench.table([result])


def test_refuses_what_onnx_runtime_does_not_run():
    with pytest.raises(bench.BenchError, match="float32 on the CPU only"):
        bench_onnx.embed_onnx_part(bench.Config(dtype="bfloat16"))
