"""One item -> its records: decode, choose the boxes, remove the background, draw edges,
render, write the previews. The same code runs in every worker process (`build_stages` once
per process, then `process_safely` per item)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import cv2
import numpy as np

from leopard_jax.preprocess import background, detect, edges, inputs, render

# A detection stands for an annotated box when they overlap this much (PASCAL VOC's rule).
MATCH_IOU = 0.5
Box = tuple[int, int, int, int]


@dataclasses.dataclass
class PhotoResult:
    records: list[tuple[dict[str, str], np.ndarray]]
    rejected: str | None = None  # the reason when the photo produced no record


@dataclasses.dataclass
class Stages:
    """The per-process models and settings one photo needs; built once per worker."""

    settings: dict[str, Any]
    detector: detect.Detector | None
    remover: background.BackgroundRemover | None


def build_stages(settings: dict[str, Any]) -> Stages:
    det, bg, threads = settings["detector"], settings["background"], settings["onnx_threads"]
    cv2.setNumThreads(threads)
    detector = None
    if det["model"].lower() != "none":
        detector = detect.Detector(
            det["model"],
            fmt=det["format"],
            input_size=det["input_size"],
            classes=det["classes"],
            threshold=det["threshold"],
            iou_threshold=det["iou"],
            max_detections=det["max_detections"],
            threads=threads,
        )
    remover = None
    if bg["model"].lower() != "none":
        remover = background.BackgroundRemover(
            bg["model"], custom_session=bg["custom_session"], fill=bg["fill"], threads=threads
        )
    return Stages(settings, detector, remover)


def _detections(stages: Stages, rgb: np.ndarray) -> list[tuple[Box, float]]:
    """Padded integer boxes (with scores) of the animals the detector finds, best first."""
    height, width = rgb.shape[:2]
    det = stages.settings["detector"]
    boxes = []
    for d in stages.detector(rgb):
        box = detect.pad_box(d.box, det["padding"], (height, width))
        if min(box[2] - box[0], box[3] - box[1]) >= det["min_box_side"]:
            boxes.append((box, d.score))
    return boxes


def crop_boxes(
    stages: Stages, rgb: np.ndarray, photo: inputs.Photo
) -> list[tuple[Box, float | None]]:
    """The boxes (with detector scores) to crop: the annotated box; or, with boxes=detector,
    the detection that matches it best; without an annotation every detection, or the whole
    photo without a detector. Raises ImageError when an annotated box gives no crop."""
    s = stages.settings
    height, width = rgb.shape[:2]
    if photo.box is None:
        if stages.detector is None:
            return [((0, 0, width, height), None)]
        found = _detections(stages, rgb)
        if not found:
            raise inputs.ImageError(f"no animal detected (threshold {s['detector']['threshold']})")
        return found
    box = detect.pad_box(photo.box, 0.0, (height, width))  # clipped, rounded outward
    side = min(box[2] - box[0], box[3] - box[1])
    if side <= 0:
        raise inputs.ImageError(f"annotated box lies outside the photo ({width}x{height} px)")
    if side < s["min_image_side"]:
        raise inputs.ImageError(
            f"annotated box too small ({box[2] - box[0]}x{box[3] - box[1]} px; minimum side is "
            f"{s['min_image_side']})"
        )
    if s["boxes"] != "detector":
        return [(box, None)]
    found = _detections(stages, rgb)
    if found:
        overlap = detect.iou(np.array(box, np.float32), np.array([b for b, _ in found], np.float32))
        best = int(np.argmax(overlap))
        if overlap[best] >= MATCH_IOU:
            return [found[best]]
    raise inputs.ImageError(f"no detection matches the annotated box (IoU >= {MATCH_IOU})")


def render_crop(stages: Stages, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One crop -> (RGB shown, edge map at crop size, H×W×4 record)."""
    s = stages.settings
    removed = stages.remover(crop)[0] if stages.remover is not None else crop
    rgb = removed if s["rgb_source"] == "removed" else crop
    edge_input = removed if s["edges"]["source"] == "removed" else crop
    e = s["edges"]
    edge = edges.edge_map(
        edge_input,
        equalize=e["equalize"],
        blur_ksize=e["blur_ksize"],
        blur_sigma=e["blur_sigma"],
        canny_low=e["canny_low"],
        canny_high=e["canny_high"],
        l2_gradient=e["l2_gradient"],
    )
    r = s["render"]
    record = render.render(rgb, edge, r["height"], r["width"], r["mode"], r["pad_value"])
    return rgb, edge, record


def _write_jpeg(path: pathlib.Path, image: np.ndarray, quality: int, max_side: int) -> None:
    """Atomic (temp + rename): a killed worker leaves no truncated preview."""
    height, width = image.shape[:2]
    if max_side and max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise OSError(f"could not encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.tobytes())
    os.replace(tmp, path)


def process_photo(stages: Stages, photo: inputs.Photo, output: pathlib.Path) -> PhotoResult:
    """One item -> its records (one per animal), previews written; or the reason it has none."""
    s = stages.settings
    try:
        rgb = inputs.load_image(photo.source, s["min_image_side"])
        boxes = crop_boxes(stages, rgb, photo)
    except inputs.ImageError as e:
        return PhotoResult([], str(e))
    cropped = stages.detector is not None or photo.box is not None
    out = []
    for i, (box, score) in enumerate(boxes):
        key = f"{photo.name}#{i}"
        x0, y0, x1, y1 = box
        shown, edge, record = render_crop(stages, rgb[y0:y1, x0:x1])
        crop_rel, edge_rel = f"crops/{key}.jpg", f"edges/{key}.jpg"
        _write_jpeg(output / crop_rel, shown, s["jpeg_quality"], s["jpeg_max_side"])
        _write_jpeg(output / edge_rel, edge, s["jpeg_quality"], s["jpeg_max_side"])
        row = {
            "key": key,
            "source": photo.source,
            "identity": photo.identity,
            "flank": photo.flank,
            "box": " ".join(str(v) for v in box) if cropped else "",
            "score": f"{score:.4f}" if score is not None else "",
            "crop": crop_rel,
            "edge": edge_rel,
            "annotation": photo.annotation,
            "viewpoint": photo.viewpoint,
            "date": photo.date,
            "split": photo.split,
        }
        out.append((row, record))
    return PhotoResult(out)


def process_safely(stages: Stages, photo: inputs.Photo, output: pathlib.Path) -> PhotoResult:
    """Any failure on one photo is its rejection reason, never the end of the run."""
    try:
        return process_photo(stages, photo, output)
    except MemoryError:
        return PhotoResult([], "out of memory while processing (photo too large?)")
    except Exception as e:  # noqa: BLE001 - a bad photo must not stop thousands of good ones
        return PhotoResult([], f"failed: {type(e).__name__}: {e}")
