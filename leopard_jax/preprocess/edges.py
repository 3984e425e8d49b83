"""The edge channel: histogram equalisation -> Gaussian blur -> Canny (paper §2.2.3).

Equalising first makes rosettes on dark (IR night) and bright coats cross the same Canny
thresholds; the blur keeps fur texture from producing edges.
"""

from __future__ import annotations

import cv2
import numpy as np


def edge_map(
    rgb: np.ndarray,
    *,
    equalize: bool = True,
    blur_ksize: int = 5,
    blur_sigma: float = 0.0,
    canny_low: float = 55,
    canny_high: float = 160,
    l2_gradient: bool = False,
) -> np.ndarray:
    """RGB uint8 H×W×3 -> edges uint8 H×W (0 or 255). blur_ksize 0 skips the blur."""
    if blur_ksize and blur_ksize % 2 == 0:
        raise ValueError(
            f"edges.blur_ksize={blur_ksize}: the Gaussian kernel size must be odd (e.g. 5)"
        )
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if equalize:
        grey = cv2.equalizeHist(grey)
    if blur_ksize:
        grey = cv2.GaussianBlur(grey, (blur_ksize, blur_ksize), blur_sigma)
    return cv2.Canny(grey, canny_low, canny_high, L2gradient=l2_gradient)
