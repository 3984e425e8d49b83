"""The `embed_onnx` bench part: ONNX Runtime on the exported model against the PyTorch reference.

    python scripts/bench.py embed_onnx [--batch 8] [--size 256,512] [--steps N]

Same contest as bench.py's `embed` part (same random weights, the same uint8 batch, the
same reference side, alternating timed rounds), but leopard_jax's side is what `embed
--backend onnx` runs: the model exported by `leopard_jax.export` (normalisation inside the
graph, grouped depthwise and 1x1 convolutions as ONNX Conv) in an ONNX Runtime CPU session
with as many threads as the reference, through `inference.embed_images_onnx`. The ratio is
withheld unless the ONNX embeddings agree with the reference's (bench.py's tolerance) and
with leopard_jax's JAX path within 1e-4 (the export's own promise).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

import numpy as np

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent))

import bench  # noqa: E402  (after the path: runs from a checkout too)

ONNX_VS_JAX = 1e-4


def onnx_embed_side(
    models: bench.Models, cfg: bench.Config, images: np.ndarray
) -> tuple[bench.Side, dict]:
    """leopard_jax's exported model on ONNX Runtime, as `embed --backend onnx` runs it."""
    from leopard_jax import embed, export, inference
    from leopard_jax.train import state as state_lib

    model_cfg = bench.train_config(cfg).model
    model = state_lib.build_model(model_cfg, axis_name=None)
    description = {
        "model": {"backbone": cfg.backbone, "head": model.head, "dims": cfg.dims, "in_chans": 4},
        "input": {"height": cfg.height, "width": cfg.width, "channels": 4},
        "info": {"source": "bench"},
    }
    start = time.perf_counter()
    proto = export.export_onnx(
        model,
        models.variables,
        height=cfg.height,
        width=cfg.width,
        channels=4,
        metadata=export.metadata(description, embed.fingerprint(models.variables)),
    )
    session, _ = export.load(proto, threads=cfg.threads or bench.cores())
    export_s = time.perf_counter() - start

    def step() -> np.ndarray:
        return inference.embed_images_onnx(session, images, batch_size=len(images))

    out = step()
    first = {
        "shape": tuple(images.shape),
        "dtype": "float32",
        "out_shape": tuple(out.shape),
        "embeddings": out,
    }
    what = (
        "leopard_jax.export -> ONNX Runtime CPU session "
        f"({session.get_session_options().intra_op_num_threads} threads), "
        "inference.embed_images_onnx (uint8 in); compile_s = export + session"
    )
    return bench.Side("leopard_jax", step, len(images), export_s, what), first


def embed_onnx_part(cfg: bench.Config, models: bench.Models | None = None) -> dict:
    """bench.py's `embed` result for the ONNX Runtime side, plus its agreement with the
    JAX path (`onnx_vs_jax_max_abs_diff`, `onnx_vs_jax_min_cosine`)."""
    if cfg.dtype != "float32" or cfg.device != "cpu":
        raise bench.BenchError("embed_onnx: ONNX Runtime runs float32 on the CPU only")
    models = models or bench.build_models(cfg)
    images = bench.synthetic_images(cfg)
    ours, ours_first = onnx_embed_side(models, cfg, images)
    ref, ref_first = bench.torch_embed_side(models, cfg, images)
    _, jax_first = bench.jax_embed_side(models, cfg, images)  # the first call only: parity
    a, b, j = ours_first["embeddings"], ref_first["embeddings"], jax_first["embeddings"]
    check = bench.first_step_disagreement(ours_first, ref_first, bench.model_tolerance(cfg))
    onnx_vs_jax = float(np.abs(a - j).max())
    if not onnx_vs_jax <= ONNX_VS_JAX:
        check.append(f"ONNX and JAX embeddings differ: max |diff| {onnx_vs_jax:.3g} > 1e-4")
    steps = cfg.steps or bench.DEFAULT_STEPS["embed"]
    result = bench.compare("embed_onnx", ours, ref, check, dataclasses.replace(cfg, steps=steps))
    result["first_embeddings_max_abs_diff"] = float(np.abs(a - b).max())
    result["onnx_vs_jax_max_abs_diff"] = onnx_vs_jax
    result["onnx_vs_jax_min_cosine"] = float(np.min(np.sum(a * j, axis=1)))
    return result
