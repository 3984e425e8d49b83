"""Real models on real photos from ../shared/data (skipped when it is absent)."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from leopard_jax.data import records
from leopard_jax.preprocess import background, detect, inputs, pipeline
from leopard_jax.preprocess import config as preprocess_config

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
FRAMES = DATA / "camera_trap_frames"
YOLOX = DATA / "yolox_nano_onnx" / "yolox_nano.onnx"
U2NETP = DATA / "u2netp_onnx" / "u2netp.onnx"
CROPS = DATA / "spotid_minimum" / "cropped"

# MegaDetector's boxes, read off the red rectangles in FRAMES/*_detections.jpg (source px).
MEGADETECTOR_BOXES = {
    "idaho-camera-traps.jpg": (364, 238, 553, 373),  # mountain lion
    "channel-islands-thumb.jpg": (18, 168, 329, 496),  # fox
    "pheasant_web.jpg": (126, 120, 587, 459),  # pheasant
}


def need(*paths):
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"shared data absent: {missing}")


@pytest.mark.parametrize("name", sorted(MEGADETECTOR_BOXES))
def test_yolox_nano_finds_the_animal_where_megadetector_does(name):
    need(FRAMES / name, YOLOX)
    found = detect.Detector(YOLOX, threshold=0.2)(inputs.load_image(FRAMES / name))
    assert found, "no animal found"
    best = found[0]
    iou = detect.iou(
        np.array(best.box, np.float32), np.array([MEGADETECTOR_BOXES[name]], np.float32)
    )[0]
    assert iou > 0.6, (best, iou)
    assert 14 <= best.class_id <= 23


@pytest.fixture(scope="module")
def u2netp():
    need(U2NETP)
    return background.BackgroundRemover(str(U2NETP))


@pytest.mark.parametrize("index", [0, 20, 40])
def test_u2netp_through_rembg_masks_the_leopard(u2netp, index):
    need(CROPS)
    path = sorted(CROPS.rglob("*.jpg"))[index]
    rgb = inputs.load_image(path)
    removed, mask = u2netp(rgb)
    assert mask.shape == rgb.shape[:2] and removed.shape == rgb.shape
    fg = mask > 127
    assert 0.15 < fg.mean() < 0.85, fg.mean()  # a body, neither nothing nor everything
    h, w = fg.shape
    centre = fg[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean()
    rim = np.concatenate(
        [
            fg[: h // 10].ravel(),
            fg[-h // 10 :].ravel(),
            fg[:, : w // 10].ravel(),
            fg[:, -w // 10 :].ravel(),
        ]
    ).mean()
    assert centre > 0.6 and centre > rim + 0.25, (centre, rim)  # the crop is centred on the animal
    assert removed[~fg].mean() < 0.5 * rgb[~fg].mean() + 1  # background darkened towards fill 0


def test_all_spotid_crops_become_records(tmp_path):
    need(CROPS)
    c = preprocess_config.get_config()
    c.input, c.output, c.detector.model, c.workers = str(CROPS), str(tmp_path / "ds"), "none", -1
    c.jpeg_max_side = 256
    summary = pipeline.run(c, log=lambda m: None)
    assert (summary.processed, summary.records, sum(summary.rejected.values())) == (45, 45, 0)
    settings = records.load_settings(tmp_path / "ds")
    assert (settings["height"], settings["width"], settings["channels"]) == (256, 512, 4)
    assert settings["edges"]["canny_low"] == 55 and settings["edges"]["blur_ksize"] == 5
    source = records.RecordSource(tmp_path / "ds")
    assert len(source) == 45
    assert {r["identity"] for r in source.rows} == {
        "BGL09_right",
        "BHA32_Right",
        "BRL17_Left",
        "CUL66_Left",
    }
    assert {r["flank"] for r in source.rows} == {"left", "right"}
    densities = []
    for i, row in enumerate(source.rows):
        record = source[i]
        assert record.shape == (256, 512, 4) and record.dtype == np.uint8
        edge = record[..., 3]
        densities.append((edge > 0).mean())
        # the RGB is the photo, resized: compare with an independent Pillow resize
        want = np.asarray(
            Image.open(row["source"]).convert("RGB").resize((512, 256), Image.BILINEAR), np.float32
        )
        assert np.abs(record[..., :3].astype(np.float32) - want).mean() < 12
    densities = np.array(densities)
    # edges everywhere, not noise everywhere
    assert densities.min() > 0.01 and np.median(densities) < 0.5
