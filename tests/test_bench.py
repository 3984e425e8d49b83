"""scripts/bench.py at toy size: both sides really run, the same-computation check passes
for the same function and refuses a different one, and the CLI fails clearly without CUDA."""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
bench = importlib.import_module("bench")
reference = importlib.import_module("bench_reference_torch")

# ResNet-18 compiles in a fraction of EfficientNetV2's time; the harness logic is the same,
# and the EfficientNetV2 import/parity has its own tests (tests of leopard_jax.models).
CFG = bench.Config(
    batch=2, height=64, width=128, steps=1, rounds=1, backbone="resnet18", dims=64, num_classes=8
)


@pytest.fixture(scope="module")
def models():
    bench.setup_devices(CFG)
    return bench.build_models(CFG)


@pytest.fixture(scope="module")
def batch():
    return bench.synthetic_batch(CFG)


@pytest.fixture(scope="module")
def jax_train(models, batch):
    return bench.JaxTrain(models, CFG, *batch)


def test_train_reports_ratio_when_same_computation(models, jax_train):
    result = bench.train_part(CFG, models, jax_train)
    assert result["same_computation"], result["refused_because"]
    assert result["ratio"] > 0
    losses = result["first_loss"]
    assert losses["leopard_jax"] == pytest.approx(losses["reference"], rel=2e-3)
    # An untrained CosFace loss on 8 classes sits well above log(8): a real forward ran.
    assert losses["reference"] > np.log(8)
    for side in ("leopard_jax", "reference"):
        assert result[side]["images_per_s"] > 0 and result[side]["steps"] == 1
    assert result["leopard_jax"]["compile_s"] > 0


def test_train_refuses_a_different_loss(models, jax_train, batch):
    """Reference with the constant CosFace margin: same shapes and dtype, different loss."""
    ours, ours_first = jax_train.side()
    theirs, ref_first = bench.torch_train_side(models, CFG, *batch, adaptive=False)
    check = bench.first_step_disagreement(ours_first, ref_first, bench.TOLERANCE["float32"])
    assert len(check) == 1 and "first-step loss differs" in check[0]
    result = bench.compare("train", ours, theirs, check, CFG)
    assert result["ratio"] is None and not result["same_computation"]
    assert "REFUSED" in bench.table([result]) and "first-step loss differs" in bench.table([result])


def test_embed_matches_reference(models):
    result = bench.embed_part(CFG, models)
    assert result["same_computation"], result["refused_because"]
    assert result["first_embeddings_max_abs_diff"] < 2e-3


def test_disagreement_names_shape_and_dtype():
    ours = {"shape": (2, 64, 128, 4), "dtype": "float32", "loss": 3.0}
    assert bench.first_step_disagreement(ours, dict(ours), bench.TOLERANCE["float32"]) == []
    reasons = bench.first_step_disagreement(
        ours,
        {"shape": (2, 4, 64, 128), "dtype": "bfloat16", "loss": 3.0},
        bench.TOLERANCE["float32"],
    )
    assert [r.split()[0] for r in reasons] == ["shape", "dtype"]
    assert bench.first_step_disagreement(
        ours, {**ours, "loss": float("nan")}, bench.TOLERANCE["float32"]
    )


def test_reference_loss_matches_plain_loop():
    """The torch adaptive CosFace against a per-row loop of the paper's formula."""
    import torch

    rng = np.random.default_rng(1)
    emb, centers = rng.standard_normal((3, 5)), rng.standard_normal((4, 5))
    labels = np.array([0, 3, -1])
    got = float(
        reference.cosface_loss(torch.tensor(emb), torch.tensor(centers), torch.tensor(labels))
    )
    rows = []
    for e, y in zip(emb, labels):
        if y < 0:
            continue
        cos = centers @ e / np.linalg.norm(centers, axis=1) / np.linalg.norm(e)
        logits = 64.0 * cos
        logits[y] = 64.0 * (cos[y] - 0.28 * ((1 - cos[y] ** 2) ** 4 + 0.1) / 1.1)
        rows.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[y])
    assert got == pytest.approx(np.mean(rows), rel=1e-5)


def test_data_loaders_agree_in_process(tmp_path):
    """Workers 0 (in-process) keeps this fast; the check compares the first batches exactly."""
    cfg = dataclasses.replace(CFG, steps=2, height=32, width=64)
    result = bench.data_part(cfg, workers=0)
    assert result["same_computation"], result["refused_because"]
    assert result["ratio"] > 0


def test_gpu_without_cuda_fails_in_one_line():
    import jax

    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="--device gpu: .*(GPU|CUDA)"):
        bench.setup_devices(dataclasses.replace(CFG, device="gpu"))


def test_cli_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        bench.parse_args(["train", "--size", "8,8"])
    parts, cfg, out = bench.parse_args(
        ["all", "--batch", "4", "--size", "128,256", "--json", "x.json"]
    )
    assert parts == list(bench.PARTS) and (cfg.batch, cfg.height, cfg.width, out) == (
        4,
        128,
        256,
        "x.json",
    )


def test_run_writes_every_stage_as_it_goes(monkeypatch):
    """A part with several results (preprocess) lands in the report handed to the writer."""
    stages = [{"part": "preprocess/a", "skipped": "x"}, {"part": "preprocess/b", "skipped": "y"}]
    monkeypatch.setattr(bench, "setup_devices", lambda cfg: {})
    monkeypatch.setattr(bench, "preprocess_part", lambda cfg: [dict(s) for s in stages])
    written = []
    report = bench.run(
        ["preprocess"], CFG, on_part=lambda r: written.append([x["part"] for x in r["results"]])
    )
    assert written == [["preprocess/a", "preprocess/b"]]
    assert all("wall_s" in r for r in report["results"])
    assert "skipped: x" in bench.table(report["results"])


def test_preprocess_runs_on_its_own_inputs():
    """Made-here photos only; the ONNX stages wait for their files to be passed."""
    results = bench.preprocess_part(dataclasses.replace(CFG, steps=1))
    parts = {r["part"]: r for r in results}
    stages = [p.removeprefix("preprocess/") for p in parts]
    assert stages == ["edges", "render", "rembg", "detect"]
    for stage in ("edges", "render"):
        assert parts[f"preprocess/{stage}"]["same_computation"], parts[f"preprocess/{stage}"]
        assert "leopard_jax.data.synthetic" in parts[f"preprocess/{stage}"]["note"]
    assert "--u2netp" in parts["preprocess/rembg"]["skipped"]
    assert "--yolox" in parts["preprocess/detect"]["skipped"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert bench.main(["nope"]) == 2
    assert bench.main(["--u2netp", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "nope" in err[0] and "missing.onnx: not a file" in err[1]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0


def test_a_part_without_reference_prints_its_own_figures():
    """The local matcher has no PyTorch side: its row lists its figures instead of ratios."""
    text = bench.table([{"part": "local", "figures": {"match_verify_ms_per_pair": 4.4}}])
    assert "local" in text and "match_verify_ms_per_pair 4.4" in text
    assert "local" in bench.PARTS


def test_each_side_alone_reports_its_own_peak_memory():
    """Two child processes, one per side (`--peak-of`): each runs its steps and reports a
    peak above what importing both frameworks and building the weights costs."""
    peaks = bench.peaks_alone("train", CFG)
    for side in ("leopard_jax", "reference"):
        assert peaks[side] > 300, peaks  # torch + jax + a built model, in MiB
    assert peaks["ratio"] == round(peaks["leopard_jax"] / peaks["reference"], 3)
    text = bench.table([{"part": "train", "skipped": "x", "peak_rss_alone_mib": peaks}])
    assert f"leopard_jax {peaks['leopard_jax']:.0f} MiB" in text


def test_each_side_alone_with_its_own_framework_only(models):
    """`--peak-own` children: leopard_jax's loads the converted weights the parent wrote and
    never imports torch, the reference's never imports JAX (each child stops if it did)."""
    peaks = bench.peaks_own_framework("train", CFG, models)
    for side in ("leopard_jax", "reference"):
        assert peaks[side] > 100, peaks
    assert peaks["ratio"] == round(peaks["leopard_jax"] / peaks["reference"], 3)
    text = bench.table([{"part": "train", "skipped": "x", "peak_rss_own_framework_mib": peaks}])
    assert "each side alone, its own framework only: leopard_jax" in text


def test_peak_of_measures_train_or_embed_only(capsys):
    assert bench.main(["local", "--peak-of=reference"]) == 2
    assert "--peak-of needs one part: train or embed" in capsys.readouterr().err


def test_layers_are_b2s_convolutions():
    """bench_layers' list holds exactly the 3×3 and depthwise kernels of B2's parameters."""
    import collections

    import jax
    import jax.numpy as jnp

    from leopard_jax.train import state as state_lib

    layers = importlib.import_module("bench_layers")
    cfg = bench.Config(batch=1, height=64, width=128)
    assert cfg.backbone == "efficientnetv2_b2"
    model = state_lib.build_model(bench.train_config(cfg).model, axis_name=None)
    image = jnp.zeros((1, 64, 128, 4))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))
    in_model = collections.Counter(
        leaf.shape for leaf in jax.tree.leaves(shapes["params"]) if leaf.shape[:2] == (3, 3)
    )
    listed = collections.Counter()
    for layer in layers.B2_LAYERS:
        listed[layers.kernel_shape(layer)] += layer.count
    assert listed == in_model


def test_layers_part_times_both_sides_on_the_same_gradients(monkeypatch):
    """Both sides run every layer; a side that computes other gradients is refused."""
    layers = importlib.import_module("bench_layers")
    figures, rows = layers.bench_layers(1, 64, 64, rounds=1, calls=1)
    assert len(rows) == len(layers.B2_LAYERS)
    for kind in ("conv3x3", "depthwise"):
        assert figures[f"{kind}_ms"] > 0 and figures[f"{kind}_reference_ms"] > 0
        ratio = figures[f"{kind}_reference_ms"] / figures[f"{kind}_ms"]
        assert figures[f"{kind}_ratio"] == round(ratio, 3)
    torch_layer = layers.torch_layer
    monkeypatch.setattr(
        layers, "torch_layer", lambda layer, x, k, dy: torch_layer(layer, x, 2 * k, dy)
    )
    with pytest.raises(ValueError, match="gradients differ"):
        layers.bench_layers(1, 64, 64, rounds=1, calls=1)
