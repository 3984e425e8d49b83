"""Detector and background stages through the real ONNX Runtime / rembg code path, with tiny
ONNX models built here that have MegaDetector's, ultralytics', YOLOX's and u2net's input and
output signatures and known outputs."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from leopard_jax.preprocess import background, detect

S = 128  # detector input side: grid cells 16² + 8² + 4² = 336


def constant_model(path, input_name, input_shape, output_name, value):
    """A graph whose output is `value` whatever the input (it still reads the input)."""
    value = np.asarray(value, np.float32)
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["const", "nothing"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes,
        "constant",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, list(value.shape))],
        initializer=[
            numpy_helper.from_array(value, "const"),
            numpy_helper.from_array(np.zeros((), np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def iou(a, b):
    return float(detect.iou(np.asarray(a, np.float32), np.asarray([b], np.float32))[0])


def test_yolov5_megadetector_layout(tmp_path):
    """[1, 3 anchors × cells, 5 + 3]: the animal box comes back in source pixels; its shifted
    duplicate is suppressed, the person and the low-confidence animal are dropped."""
    rows = np.zeros((3 * 336, 8), np.float32)
    # Source 200×100 (W×H) -> scale 0.64, image centred: 32 px grey above. Source box
    # (50, 20, 150, 80) -> input (32, 44.8, 96, 83.2): cx 64, cy 64, w 64, h 38.4.
    rows[10] = [64, 64, 64, 38.4, 0.9, 1, 0, 0]
    rows[11] = [66, 65, 64, 38.4, 0.8, 1, 0, 0]  # duplicate, IoU ≈ 0.9
    rows[12] = [20, 60, 20, 30, 0.95, 0, 1, 0]  # person
    rows[13] = [110, 70, 20, 20, 0.1, 1, 0, 0]  # animal below threshold
    model = constant_model(tmp_path / "md.onnx", "images", [1, 3, S, S], "output", rows[None])
    detector = detect.Detector(model, threshold=0.2)
    assert detector.format == "yolov5" and detector.classes == (0,)
    found = detector(np.zeros((100, 200, 3), np.uint8))
    assert len(found) == 1
    np.testing.assert_allclose(found[0].box, (50, 20, 150, 80), atol=0.5)
    assert found[0].score == pytest.approx(0.9) and found[0].class_id == 0


def test_ultralytics_layout(tmp_path):
    """[1, 4 + 80, cells], COCO classes: 'animal' keeps cat (15), drops person (0)."""
    out = np.zeros((84, 336), np.float32)
    # Source 100×200 (W×H) -> scale 0.64, image centred: 32 px left. Source box
    # (25, 50, 75, 150) -> input (48, 32, 80, 96).
    out[:4, 5] = [64, 64, 32, 64]
    out[4 + 15, 5] = 0.8
    out[:4, 6] = [64, 64, 30, 60]
    out[4 + 0, 6] = 0.99
    model = constant_model(tmp_path / "v8.onnx", "images", [1, 3, S, S], "output0", out[None])
    detector = detect.Detector(model)
    assert detector.format == "ultralytics" and detector.classes == tuple(range(14, 24))
    (found,) = detector(np.zeros((200, 100, 3), np.uint8))
    np.testing.assert_allclose(found.box, (25, 50, 75, 150), atol=0.5)
    assert found.class_id == 15 and found.score == pytest.approx(0.8)


def test_yolox_grid_decoding(tmp_path):
    """[1, cells, 85] relative to the grid: cell (x=3, y=2) of the stride-16 level."""
    rows = np.zeros((336, 85), np.float32)
    rows[16 * 16 + 2 * 8 + 3, :5] = [0.5, 0.5, np.log(2.0), np.log(1.5), 0.9]
    rows[16 * 16 + 2 * 8 + 3, 5 + 16] = 1.0  # dog
    # Input box: centre ((3 + .5)·16, (2 + .5)·16) = (56, 40), size 32×24. Source 256×128
    # (W×H) -> scale 0.5, placed top-left: source box (80, 56, 144, 104).
    model = constant_model(tmp_path / "yolox.onnx", "images", [1, 3, S, S], "output", rows[None])
    detector = detect.Detector(model)
    assert detector.format == "yolox"
    (found,) = detector(np.zeros((128, 256, 3), np.uint8))
    np.testing.assert_allclose(found.box, (80, 56, 144, 104), atol=0.5)
    assert found.class_id == 16 and found.score == pytest.approx(0.9)


def test_input_colour_order_and_scale(tmp_path):
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 255
    for fmt, channel, value in (("yolox", 2, 255.0), ("yolov5", 0, 1.0)):
        cells = 336 if fmt == "yolox" else 3 * 336
        model = constant_model(
            tmp_path / f"{fmt}.onnx", "images", [1, 3, S, S], "out", np.zeros((1, cells, 85))
        )
        x, placement = detect.Detector(model, fmt=fmt).preprocess(red)
        assert x.shape == (1, 3, S, S) and x.dtype == np.float32
        top = placement.top
        assert x[0, channel, top + 1, placement.left + 1] == value
        assert x[0, (channel + 1) % 3, top + 1, placement.left + 1] == 0
    # YOLOX keeps the image top-left; the others centre it (pad 114 elsewhere).
    assert detect.letterbox(red[:32], (S, S), centre=False)[1].top == 0
    assert detect.letterbox(red[:32], (S, S), centre=True)[1].top == 32


@pytest.mark.parametrize(
    "shape, hw, fmt",
    [
        ((1, 25200, 8), (640, 640), "yolov5"),
        ((1, 102000, 8), (1280, 1280), "yolov5"),  # MegaDetector v5a (P6, strides to 64)
        ((1, 84, 8400), (640, 640), "ultralytics"),
        ((1, 3549, 85), (416, 416), "yolox"),
        ((1, 84, 85), (64, 64), "yolox"),  # ambiguous by size alone; the grid decides
    ],
)
def test_infer_format(shape, hw, fmt):
    assert detect.infer_format(shape, hw) == fmt


def test_nms_matches_brute_force():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 40, (60, 2))], 1).astype(np.float32)
    scores = rng.uniform(size=60).astype(np.float32)
    kept = []
    for i in sorted(range(60), key=lambda i: -scores[i]):
        if all(iou(boxes[i], boxes[j]) <= 0.45 for j in kept):
            kept.append(i)
    assert list(detect.nms(boxes, scores, 0.45)) == kept


def test_class_spec_and_padding():
    assert detect.parse_classes("14-16,0", 80) == (14, 15, 16, 0)
    assert detect.parse_classes("all", 3) == (0, 1, 2)
    with pytest.raises(ValueError, match="ids must lie"):
        detect.parse_classes("5", 3)
    with pytest.raises(ValueError, match="set detector.classes"):
        detect.parse_classes("animal", 7)
    assert detect.pad_box((10, 10, 30, 50), 0.1, (100, 100)) == (8, 6, 32, 54)
    assert detect.pad_box((0, 0, 30, 50), 0.5, (40, 40)) == (0, 0, 40, 40)


def test_dynamic_input_needs_a_size(tmp_path):
    model = constant_model(
        tmp_path / "dyn.onnx", "images", [1, 3, "h", "w"], "out", np.zeros((1, 3 * 336, 8))
    )
    with pytest.raises(ValueError, match="input_size"):
        detect.Detector(model)
    assert detect.Detector(model, input_size=S).format == "yolov5"


def u2net_like(path):
    """u2net's signature ([1,3,320,320] -> [1,1,320,320]); the mask is the channel mean,
    so bright pixels are foreground."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input.1"], ["1959"], axes=[1], keepdims=1)],
        "u2net_like",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 320, 320])],
        [helper.make_tensor_value_info("1959", TensorProto.FLOAT, [1, 1, 320, 320])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return str(path)


def test_background_mask_applied_from_a_local_model_file(tmp_path, monkeypatch):
    """rembg only loads custom files inside its home: the file lives elsewhere, it loads,
    and the environment is as before afterwards."""
    monkeypatch.delenv("U2NET_HOME", raising=False)
    monkeypatch.setenv("REMBG_HOME", str(tmp_path / "elsewhere"))
    model = u2net_like(tmp_path / "bright.onnx")
    remover = background.BackgroundRemover(model, fill=0)
    assert "U2NET_HOME" not in os.environ and os.environ["REMBG_HOME"] == str(
        tmp_path / "elsewhere"
    )
    assert not (tmp_path / "elsewhere").exists()
    rgb = np.full((120, 200, 3), 40, np.uint8)
    rgb[30:90, 50:150] = (200, 180, 160)
    removed, mask = remover(rgb)
    assert mask.shape == (120, 200) and mask.dtype == np.uint8
    assert mask[40:80, 60:140].min() > 200 and mask[:20].max() < 50 and mask[:, :40].max() < 50
    assert removed[:20].max() <= 8  # background -> fill (0), from 40
    np.testing.assert_allclose(removed[40:80, 60:140], rgb[40:80, 60:140], atol=40)


def test_background_errors():
    with pytest.raises(FileNotFoundError, match="no such file"):
        background.new_session("/no/such/model.onnx")
    with pytest.raises(ValueError, match="no-such-rembg-model"):
        background.new_session("no-such-rembg-model")
