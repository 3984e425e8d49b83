"""Animal boxes from a YOLO-family ONNX detector run with ONNX Runtime.

Three output layouts are read, told apart by the model's own output shape:
  yolov5       [1, N, 5+C], N = 3 anchors × grid cells; rows (cx, cy, w, h, obj, cls...) in
               input pixels. MegaDetector v5's export.
  ultralytics  [1, 4+C, N], N = grid cells; rows (cx, cy, w, h, cls...) in input pixels.
  yolox        [1, N, 5+C], N = grid cells; (x, y, log w, log h) relative to each cell,
               decoded here; BGR 0–255 input, image placed top-left in the letterbox.
"""

from __future__ import annotations

import dataclasses
import os

import cv2
import numpy as np

FORMATS = ("yolov5", "ultralytics", "yolox")
_STRIDE_SETS = ((8, 16, 32), (8, 16, 32, 64))
_PAD_VALUE = 114  # the grey every YOLO family letterboxes with
# Class ids meaning "an animal" for the two class lists we know by their size.
_ANIMAL_CLASSES = {3: (0,), 80: tuple(range(14, 24))}  # MegaDetector; COCO bird..giraffe


@dataclasses.dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in source pixels
    score: float
    class_id: int


@dataclasses.dataclass(frozen=True)
class Letterbox:
    """How a source image was placed in the model input: input = source * scale + offset."""

    scale: float
    left: int
    top: int


def letterbox(
    image: np.ndarray, size: tuple[int, int], centre: bool
) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio to fit `size` (H, W), pad with grey 114."""
    height, width = image.shape[:2]
    scale = min(size[0] / height, size[1] / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interp)
    top, left = ((size[0] - new_h) // 2, (size[1] - new_w) // 2) if centre else (0, 0)
    canvas = np.full((size[0], size[1], image.shape[2]), _PAD_VALUE, dtype=image.dtype)
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas, Letterbox(scale, left, top)


def unletterbox(boxes: np.ndarray, placement: Letterbox) -> np.ndarray:
    """Input-pixel xyxy boxes -> source-pixel xyxy boxes."""
    offset = np.array([placement.left, placement.top] * 2, dtype=np.float32)
    return (boxes - offset) / placement.scale


def grid_cells(height: int, width: int, strides) -> int:
    return sum((height // s) * (width // s) for s in strides)


def infer_format(output_shape, input_hw: tuple[int, int]) -> str:
    """Tell the layout from shapes: N equals the grid cells (yolox, ultralytics) or three
    anchors per cell (yolov5). Falls back to 'the long axis is N'."""
    _, a, b = output_shape
    cells = {grid_cells(*input_hw, s) for s in _STRIDE_SETS}
    if a in cells:
        return "yolox"
    if a in {3 * c for c in cells}:
        return "yolov5"
    if b in cells:
        return "ultralytics"
    return "yolov5" if a > b else "ultralytics"


def yolox_grid(input_hw: tuple[int, int], strides=(8, 16, 32)) -> tuple[np.ndarray, np.ndarray]:
    """Cell origins (x, y) and strides of YOLOX's flattened output rows."""
    origins, steps = [], []
    for s in strides:
        h, w = input_hw[0] // s, input_hw[1] // s
        ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        origins.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        steps.append(np.full((h * w, 1), s))
    return np.concatenate(origins).astype(np.float32), np.concatenate(steps).astype(np.float32)


def decode(
    output: np.ndarray, fmt: str, input_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Raw output [1, ...] -> (xyxy boxes in input pixels [N, 4], class scores [N, C])."""
    out = np.asarray(output, dtype=np.float32)[0]
    if fmt == "ultralytics":
        out = out.T
        xywh, scores = out[:, :4], out[:, 4:]
    elif fmt == "yolov5":
        xywh, scores = out[:, :4], out[:, 5:] * out[:, 4:5]
    elif fmt == "yolox":
        strides = next(s for s in _STRIDE_SETS if grid_cells(*input_hw, s) == len(out))
        origins, steps = yolox_grid(input_hw, strides)
        xy = (out[:, :2] + origins) * steps
        wh = np.exp(np.minimum(out[:, 2:4], 20.0)) * steps
        xywh, scores = np.concatenate([xy, wh], axis=1), out[:, 5:] * out[:, 4:5]
    else:
        raise ValueError(f"detector format {fmt!r}: use one of {FORMATS}")
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
    return boxes, scores


def _area(b: np.ndarray) -> np.ndarray:
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return inter / np.maximum(_area(box) + _area(boxes) - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression, class-agnostic (we want one record per animal)."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(best)
        order = order[iou(boxes[best], boxes[order]) <= iou_threshold]
    return np.array(keep, dtype=np.int64)


def parse_classes(spec: str | int | tuple | list, num_classes: int) -> tuple[int, ...]:
    """ "animal" (MegaDetector 0, COCO 14–23), "all", or ids like "0" / "14-23,0"."""
    if isinstance(spec, (list, tuple)):
        return tuple(int(c) for c in spec)
    spec = str(spec).strip().lower()
    if spec == "all":
        return tuple(range(num_classes))
    if spec == "animal":
        if num_classes not in _ANIMAL_CLASSES:
            raise ValueError(
                f"detector has {num_classes} classes; 'animal' is known only for MegaDetector "
                "(3) and COCO (80): set detector.classes to the animal class ids, e.g. "
                "--config.detector.classes=0"
            )
        return _ANIMAL_CLASSES[num_classes]
    ids: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        ids.extend(range(int(lo), int(hi or lo) + 1))
    if not ids or max(ids) >= num_classes or min(ids) < 0:
        raise ValueError(f"detector.classes={spec!r}: ids must lie in 0..{num_classes - 1}")
    return tuple(ids)


def select(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: tuple[int, ...],
    threshold: float,
    iou_threshold: float,
    max_detections: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class filter -> confidence threshold -> NMS -> top max_detections."""
    wanted = scores[:, list(classes)]
    best = np.argmax(wanted, axis=1)
    score = wanted[np.arange(len(wanted)), best]
    class_id = np.asarray(classes)[best]
    keep = score >= threshold
    boxes, score, class_id = boxes[keep], score[keep], class_id[keep]
    kept = nms(boxes, score, iou_threshold)[:max_detections]
    return boxes[kept], score[kept], class_id[kept]


def pad_box(box, padding: float, image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Grow a box by `padding` × its size on each side, clip to the image, round outward."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * padding, (y1 - y0) * padding
    height, width = image_hw
    return (
        int(max(0, np.floor(x0 - dx))),
        int(max(0, np.floor(y0 - dy))),
        int(min(width, np.ceil(x1 + dx))),
        int(min(height, np.ceil(y1 + dy))),
    )


def session_options(threads: int = 0):
    """`threads` intra-op threads (0 = ONNX Runtime's choice). Denormals are flushed to zero:
    it cannot change a detection, and it guards against slow denormal arithmetic on CPUs
    (no difference measured here with a random-weight MegaDetector-size model)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return options


def providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def onnx_session(model_path: str | os.PathLike, threads: int = 0):
    """One ONNX Runtime session (one per worker process)."""
    import onnxruntime as ort

    return ort.InferenceSession(
        str(model_path), sess_options=session_options(threads), providers=providers()
    )


class Detector:
    """A detector session plus what its outputs mean (format, input size, classes)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        fmt: str = "auto",
        input_size: int | tuple[int, int] = 0,
        classes="animal",
        threshold: float = 0.2,
        iou_threshold: float = 0.45,
        max_detections: int = 10,
        threads: int = 0,
    ):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"detector {model_path}: no such file; give an ONNX file or 'none'"
            )
        try:
            self.session = onnx_session(model_path, threads)
        except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail...)
            raise ValueError(
                f"detector {model_path}: not a loadable ONNX model ({e}); check the file"
            ) from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_hw = self._input_hw(inp.shape, input_size, model_path)
        probe = self.session.run(
            None, {self.input_name: np.zeros((1, 3, *self.input_hw), np.float32)}
        )[0]
        if probe.ndim != 3:
            raise ValueError(
                f"detector {model_path}: output shape {probe.shape} is not [1, N, K] or [1, K, N]"
            )
        self.format = infer_format(probe.shape, self.input_hw) if fmt == "auto" else fmt
        if self.format not in FORMATS:
            raise ValueError(f"detector.format={fmt!r}: use auto or one of {FORMATS}")
        num_classes = (probe.shape[1] - 4) if self.format == "ultralytics" else (probe.shape[2] - 5)
        self.classes = parse_classes(classes, num_classes)
        self.threshold, self.iou_threshold, self.max_detections = (
            threshold,
            iou_threshold,
            max_detections,
        )

    @staticmethod
    def _input_hw(shape, input_size, model_path) -> tuple[int, int]:
        if input_size:
            return (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        height, width = shape[2], shape[3]
        if not (isinstance(height, int) and isinstance(width, int)):
            raise ValueError(
                f"detector {model_path}: its input size is dynamic; set it, e.g. "
                "--config.detector.input_size=1280 for MegaDetector v5"
            )
        return height, width

    def preprocess(self, rgb: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """RGB uint8 -> NCHW float32 input; YOLOX wants BGR 0–255 top-left, others RGB 0–1
        centred."""
        yolox = self.format == "yolox"
        image, placement = letterbox(
            rgb[..., ::-1] if yolox else rgb, self.input_hw, centre=not yolox
        )
        x = image.astype(np.float32)
        if not yolox:
            x /= 255.0
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), placement

    def __call__(self, rgb: np.ndarray) -> list[Detection]:
        """Animals in an RGB uint8 photo, best first, boxes in its pixels (clipped)."""
        x, placement = self.preprocess(rgb)
        output = self.session.run(None, {self.input_name: x})[0]
        boxes, scores = decode(output, self.format, self.input_hw)
        boxes, score, class_id = select(
            boxes, scores, self.classes, self.threshold, self.iou_threshold, self.max_detections
        )
        boxes = unletterbox(boxes, placement)
        height, width = rgb.shape[:2]
        boxes = np.clip(boxes, 0, [width, height, width, height])
        return [
            Detection(tuple(float(v) for v in b), float(s), int(c))
            for b, s, c in zip(boxes, score, class_id)
        ]
