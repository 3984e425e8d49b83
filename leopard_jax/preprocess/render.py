"""Resize a crop and its edge map to the training size and stack them as one H×W×4 record."""

from __future__ import annotations

import cv2
import numpy as np

MODES = ("stretch", "letterbox")


def resize(
    image: np.ndarray, height: int, width: int, mode: str = "stretch", pad_value: int = 0
) -> np.ndarray:
    """`stretch` fills H×W ignoring the aspect ratio (as the paper); `letterbox` keeps it and
    pads the sides with `pad_value`, centred. Area interpolation when shrinking keeps thin
    edges as grey lines instead of dropping them."""
    if mode not in MODES:
        raise ValueError(f"render.mode={mode!r}: use one of {MODES}")
    src_h, src_w = image.shape[:2]
    if mode == "stretch":
        new_h, new_w = height, width
    else:
        scale = min(height / src_h, width / src_w)
        new_h, new_w = max(1, round(src_h * scale)), max(1, round(src_w * scale))
    shrink = new_h < src_h or new_w < src_w
    resized = cv2.resize(
        image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )
    if resized.ndim == 2 and image.ndim == 3:
        resized = resized[..., None]
    if (new_h, new_w) == (height, width):
        return resized
    canvas = np.full((height, width) + image.shape[2:], pad_value, dtype=image.dtype)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def render(
    rgb: np.ndarray,
    edge: np.ndarray,
    height: int = 256,
    width: int = 512,
    mode: str = "stretch",
    pad_value: int = 0,
) -> np.ndarray:
    """RGB H×W×3 + edge H×W (same size) -> uint8 height×width×4 (R, G, B, edge)."""
    if rgb.shape[:2] != edge.shape[:2]:
        raise ValueError(f"rgb {rgb.shape[:2]} and edge {edge.shape[:2]} must have the same size")
    out = np.empty((height, width, 4), np.uint8)
    # Resized apart, then stacked: OpenCV's 3- and 1-channel paths are faster than its
    # 4-channel one.
    out[..., :3] = resize(rgb, height, width, mode, pad_value)
    out[..., 3] = resize(edge, height, width, mode, pad_value)
    return out
