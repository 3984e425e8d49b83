"""Training augmentation (the paper's section 2.5.1) and the normalisation shared by all readers.

Geometry — rotation up to ±10° about the centre, then a crop of up to 10 % of each side
resized back — is one affine matrix applied to all four channels by a single
`cv2.warpAffine`, so the edge channel stays registered with the RGB pixels it was computed
from. Colour jitter touches RGB only: the edge channel is a binary Canny map, and scaling
it would invent edge strengths the detector never produced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

# RGB: ImageNet statistics (the backbone's pretraining); edge: the paper's 0.456 / 0.225.
MEAN = np.array([0.485, 0.456, 0.406, 0.456], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225, 0.225], dtype=np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the training augmentation; zeros switch a part off.

    Jitter factors are drawn uniformly from [1 - x, 1 + x]. The paper asks for a "slight"
    jitter; ±20 % brightness/contrast/saturation covers the exposure and white-balance spread
    between flash, IR and daylight frames without flipping the rosette/coat contrast. Hue is
    left alone: most camera-trap frames are near-grey IR shots, where hue is noise.
    """

    rotate_deg: float = 10.0
    crop_fraction: float = 0.1
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    @classmethod
    def of(cls, config: "AugmentConfig | Mapping[str, Any] | None") -> "AugmentConfig":
        """From a config mapping (e.g. an ml_collections ConfigDict); None = the paper's ranges."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(f"unknown augmentation settings {sorted(unknown)}; allowed: {sorted(fields)}")
        return cls(**{k: float(v) for k, v in dict(config).items()})


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 (or float in 0..255) [..., H, W, 4] -> float32 normalised per channel."""
    if image.shape[-1] != len(MEAN):
        raise ValueError(f"expected {len(MEAN)} channels (R, G, B, edge), got shape {image.shape}")
    scale = np.float32(1.0 / 255.0)
    return (image.astype(np.float32) * scale - MEAN) / STD


def geometry_matrix(rng: np.random.Generator, height: int, width: int, rotate_deg: float, crop_fraction: float) -> np.ndarray:
    """2×3 source→output affine: rotate about the centre, crop each side, resize back."""
    angle = rng.uniform(-rotate_deg, rotate_deg)
    left, right = rng.uniform(0.0, crop_fraction, size=2) * width
    top, bottom = rng.uniform(0.0, crop_fraction, size=2) * height
    rotate = np.vstack([cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0), [0, 0, 1]])
    sx, sy = width / (width - left - right), height / (height - top - bottom)
    crop = np.array([[sx, 0, -sx * left], [0, sy, -sy * top], [0, 0, 1]])
    return (crop @ rotate)[:2]


def warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply one affine to every channel at once (bilinear; zeros outside, as the paper's
    torchvision transforms)."""
    height, width = image.shape[:2]
    out = cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    return out.reshape(image.shape)


def color_jitter(rgb: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """float32 H×W×3 in 0..255 -> jittered, clipped to 0..255 (torchvision's definitions)."""
    b, c, s = (rng.uniform(1 - x, 1 + x) for x in (brightness, contrast, saturation))
    rgb = rgb * np.float32(b)
    grey = rgb @ _LUMA
    rgb = (rgb - grey.mean()) * np.float32(c) + grey.mean()
    rgb = np.clip(rgb, 0, 255)
    grey = (rgb @ _LUMA)[..., None]
    rgb = (rgb - grey) * np.float32(s) + grey
    return np.clip(rgb, 0, 255, out=rgb)


def augment(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """uint8 H×W×4 -> float32 H×W×4 in 0..255: shared geometry, then RGB-only jitter."""
    height, width = image.shape[:2]
    matrix = geometry_matrix(rng, height, width, config.rotate_deg, config.crop_fraction)
    out = warp(image, matrix).astype(np.float32)
    out[..., :3] = color_jitter(out[..., :3], rng, config.brightness, config.contrast, config.saturation)
    return out
