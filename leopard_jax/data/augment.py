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
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# normalisation as one per-pixel affine (cv2.transform: 4×4 diagonal + bias column).
_NORMALIZE = np.hstack([np.diag(1 / (255 * STD)), (-MEAN / STD)[:, None]]).astype(np.float32)
# Where augmentation runs: "host" (OpenCV in the loader's workers), "device" (inside the
# jitted step), "auto" (device on GPU/TPU, host on CPU, where both share the same cores).
PLACES = ("auto", "device", "host")


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
    where: str = "host"  # one of PLACES

    @classmethod
    def of(cls, config: AugmentConfig | Mapping[str, Any] | None) -> AugmentConfig:
        """From a config mapping (e.g. an ml_collections ConfigDict); None = the paper's ranges."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(
                f"unknown augmentation settings {sorted(unknown)}; allowed: {sorted(fields)}"
            )
        values = {k: v if k == "where" else float(v) for k, v in dict(config).items()}
        if values.get("where", cls.where) not in PLACES:
            raise ValueError(f"augment where={values['where']!r} is not one of {PLACES}")
        return cls(**values)

    def place(self, backend: str) -> str:
        """ "host" or "device" for this backend ("auto": device unless the backend is cpu)."""
        if self.where != "auto":
            return self.where
        return "host" if backend == "cpu" else "device"


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 (or float in 0..255) [..., H, W, 4] -> float32 (x/255 - mean) / std per channel."""
    if image.shape[-1] != len(MEAN):
        raise ValueError(f"expected {len(MEAN)} channels (R, G, B, edge), got shape {image.shape}")
    flat = np.ascontiguousarray(image, dtype=np.float32).reshape(-1, 1, len(MEAN))
    return cv2.transform(flat, _NORMALIZE).reshape(image.shape)


def geometry_matrix(
    rng: np.random.Generator, height: int, width: int, rotate_deg: float, crop_fraction: float
) -> np.ndarray:
    """2×3 source→output affine: rotate about the centre, crop each side, resize back."""
    angle = rng.uniform(-rotate_deg, rotate_deg)
    left, right = rng.uniform(0.0, crop_fraction, size=2) * width
    top, bottom = rng.uniform(0.0, crop_fraction, size=2) * height
    rotate = np.vstack(
        [cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0), [0, 0, 1]]
    )
    sx, sy = width / (width - left - right), height / (height - top - bottom)
    crop = np.array([[sx, 0, -sx * left], [0, sy, -sy * top], [0, 0, 1]])
    return (crop @ rotate)[:2]


def warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply one affine to every channel at once (bilinear; zeros outside, as the paper's
    torchvision transforms)."""
    height, width = image.shape[:2]
    out = cv2.warpAffine(
        image,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return out.reshape(image.shape)


def jitter_factors(rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """[brightness, contrast, saturation] factors, each uniform in [1 - x, 1 + x]."""
    return np.array(
        [rng.uniform(1 - x, 1 + x) for x in (config.brightness, config.contrast, config.saturation)]
    )


def draw(
    rng: np.random.Generator, height: int, width: int, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """One image's random parameters, in the order `augment` draws them: (2×3 geometry
    matrix, jitter factors), float64."""
    matrix = geometry_matrix(rng, height, width, config.rotate_deg, config.crop_fraction)
    return matrix, jitter_factors(rng, config)


def jitter_matrix(factors: np.ndarray, mean_rgb: np.ndarray) -> np.ndarray:
    """4×5 colour matrix (last column: bias) for cv2.transform on R, G, B, edge, from the
    (brightness, contrast, saturation) factors and the warped image's mean RGB.

    Brightness b scales; contrast c pulls towards the image's mean grey m (after
    brightness); saturation s pulls each pixel towards its own grey (torchvision's three
    definitions). All three are linear, so they compose into one matrix, clipped once by
    cv2's uint8 saturation. The edge row is the identity: jitter never touches edges.
    """
    b, c, s = (float(x) for x in factors)
    grey_mean = b * float(LUMA @ mean_rgb)
    to_grey = np.outer(np.ones(3), LUMA)
    rgb = (
        c * b * (s * np.eye(3) + (1 - s) * to_grey)
    )  # rows of to_grey sum to 1, so the bias passes through
    matrix = np.zeros((4, 5), np.float32)
    matrix[:3, :3] = rgb
    matrix[:3, 4] = (1 - c) * grey_mean
    matrix[3, 3] = 1.0
    return matrix


def augment(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """uint8 H×W×4 -> uint8 H×W×4: shared geometry, then RGB-only colour jitter."""
    matrix, factors = draw(rng, *image.shape[:2], config)
    out = warp(image, matrix)
    if config.brightness or config.contrast or config.saturation:
        mean_rgb = np.array(cv2.mean(out)[:3], np.float32)
        out = cv2.transform(out, jitter_matrix(factors, mean_rgb))
    return out
