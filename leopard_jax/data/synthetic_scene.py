"""One synthetic camera-trap photo of a spotted animal (see synthetic.py for the data set).

An animal's coat is drawn once in a canonical side-view frame (`draw_coat`, with traits from
`coat_style` shared by both flanks); `render_photo` warps it through a random pose into a
cluttered scene with random light, occlusion, blur and noise.
"""

from __future__ import annotations

import cv2
import numpy as np

COAT_H, COAT_W = 256, 512  # canonical side view, head to the right (the right flank)
HEAD = (452, 96)  # head centre in the canonical frame (face features are painted on the coat)


def coat_style(seed: int, animal: int) -> dict[str, float]:
    """Per-animal coat traits shared by both flanks, as real leopards differ in rosette size,
    density, ring weight and ground colour: coarse cues a network can learn quickly and that
    carry over to unseen animals, while raw pixels of differently posed photos cannot use them.
    """
    rng = np.random.default_rng([seed, animal, 7])
    return dict(
        spacing=rng.uniform(18, 56),  # px between neighbouring marks in the canonical coat
        rosette_share=rng.uniform(0.3, 0.95),  # rosettes vs solid spots on the torso
        size=rng.uniform(0.22, 0.45),  # mark radius relative to the spacing
        ring=rng.uniform(0.06, 0.22),  # ring stroke relative to the spacing
        fill=rng.uniform(0.5, 0.9),  # rosette centre: darker than the ground by this factor
        tint=rng.uniform(0.65, 1.4),  # ground colour, from pale straw to deep rufous
        value=rng.uniform(0.6, 1.15),  # ground brightness
    )


def draw_coat(rng: np.random.Generator, style: dict[str, float]) -> np.ndarray:
    """BGR uint8 COAT_H×COAT_W: golden base with a paler belly, rosettes and spots."""
    base = np.array([55, 140, 200], np.float32) * rng.uniform(0.9, 1.05, 3)
    base = base * np.array([1 / style["tint"], 1.0, style["tint"]], np.float32) * style["value"]
    belly = np.array([170, 205, 225], np.float32)
    y = np.linspace(0, 1, COAT_H, dtype=np.float32)[:, None, None]
    mix = np.clip(1.0 - np.abs(y - 0.64) * 9.0, 0, 1)  # pale belly band; legs stay golden
    coat = (base * (1 - mix) + belly * mix) * np.ones((1, COAT_W, 1), np.float32)
    coat = coat.astype(np.uint8)
    dark = tuple(int(v) for v in rng.integers(10, 35, 3))
    fill = tuple(int(v * style["fill"]) for v in base)
    spacing = style["spacing"] * rng.uniform(0.95, 1.05)
    for gy in np.arange(spacing / 2, COAT_H, spacing * 0.87):
        for gx in np.arange(spacing / 2, COAT_W, spacing):
            cx, cy = (
                gx + rng.uniform(-0.35, 0.35) * spacing,
                gy + rng.uniform(-0.35, 0.35) * spacing,
            )
            centre = (int(cx), int(cy))
            on_body = 60 < cy < 165 and 70 < cx < 420
            if on_body and rng.random() < style["rosette_share"]:
                # rosette: darker centre, broken ring
                r = spacing * style["size"] * rng.uniform(0.8, 1.2)
                axes = (int(r * rng.uniform(0.9, 1.3)), int(r))
                tilt = rng.uniform(0, 180)
                cv2.ellipse(coat, centre, axes, tilt, 0, 360, fill, -1, cv2.LINE_AA)
                start = rng.uniform(0, 360)
                stroke = max(1, int(round(spacing * style["ring"] * rng.uniform(0.8, 1.2))))
                for arc in np.sort(rng.uniform(0, 360, rng.integers(3, 6))):
                    span = rng.uniform(35, 70)
                    cv2.ellipse(
                        coat,
                        centre,
                        axes,
                        tilt,
                        start + arc,
                        start + arc + span,
                        dark,
                        stroke,
                        cv2.LINE_AA,
                    )
            else:  # solid spot
                r = (
                    spacing
                    * style["size"]
                    * (rng.uniform(0.3, 0.6) if not on_body else rng.uniform(0.5, 0.7))
                )
                axes = (int(r * rng.uniform(0.8, 1.4)), max(int(r), 1))
                cv2.ellipse(coat, centre, axes, rng.uniform(0, 180), 0, 360, dark, -1, cv2.LINE_AA)
    eye, nose = (HEAD[0] + 12, HEAD[1] - 8), (HEAD[0] + 46, HEAD[1] + 8)
    cv2.ellipse(coat, eye, (7, 4), -10, 0, 360, (40, 120, 140), -1, cv2.LINE_AA)
    cv2.circle(coat, eye, 2, (5, 5, 5), -1, cv2.LINE_AA)
    cv2.ellipse(coat, nose, (6, 4), 0, 0, 360, (60, 60, 110), -1, cv2.LINE_AA)
    cv2.line(
        coat, (nose[0] - 4, nose[1] + 6), (nose[0] - 14, nose[1] + 12), (20, 20, 20), 2, cv2.LINE_AA
    )
    return coat


def _body(rng: np.random.Generator, shape: np.ndarray) -> np.ndarray:
    """uint8 COAT_H×COAT_W silhouette mask for one pose: torso, neck, head, legs, tail."""
    mask = np.zeros((COAT_H, COAT_W), np.uint8)
    s = shape  # per-animal proportions: torso length, depth, head size
    depth = int(50 * s[1])
    cv2.ellipse(mask, (245, 112), (int(150 * s[0]), depth), 0, 0, 360, 255, -1)
    cv2.ellipse(mask, (360, 115), (62, depth + 6), -15, 0, 360, 255, -1)  # chest and shoulder
    cv2.ellipse(mask, (135, 108), (62, depth + 4), 10, 0, 360, 255, -1)  # haunch
    head_y = HEAD[1] + int(rng.uniform(-10, 10))
    cv2.fillConvexPoly(
        mask,
        np.array([[375, 70], [440, head_y - 25], [455, head_y + 20], [395, 160]], np.int32),
        255,
    )
    cv2.ellipse(mask, (HEAD[0], head_y), (int(36 * s[2]), int(31 * s[2])), 0, 0, 360, 255, -1)
    cv2.ellipse(mask, (HEAD[0] + 30, head_y + 12), (18, 14), 0, 0, 360, 255, -1)  # muzzle
    for ex in (432, 452):  # ears
        cv2.circle(mask, (ex, head_y - int(29 * s[2])), 8, 255, -1)
    for x, phase, hind in (
        (118, 0.0, True),
        (168, 1.6, True),
        (345, 0.8, False),
        (390, 2.4, False),
    ):
        swing = np.sin(rng.uniform(0, 2 * np.pi) + phase) * 24
        top, knee, foot = (
            (x, 140),
            (int(x + swing * 0.5 + (10 if hind else 0)), 190),
            (int(x + swing), 240),
        )
        cv2.line(mask, top, knee, 255, 30 if hind else 26, cv2.LINE_AA)
        cv2.line(mask, knee, foot, 255, 18, cv2.LINE_AA)
        cv2.ellipse(mask, (foot[0] + 5, foot[1]), (14, 8), 0, 0, 360, 255, -1)  # paw
    t = np.linspace(0, 1, 16)
    curl = rng.uniform(-70, 50)
    tail = np.stack([80 - 78 * t, 90 + 110 * t**1.4 - curl * t**3], 1).astype(np.int32)
    for k in range(len(tail) - 1):  # tapering tail
        cv2.line(
            mask,
            tuple(int(v) for v in tail[k]),
            tuple(int(v) for v in tail[k + 1]),
            255,
            int(16 - 8 * t[k]),
            cv2.LINE_AA,
        )
    return mask


def _shading(mask: np.ndarray) -> np.ndarray:
    """float32 H×W×1 light: brighter on the back, darker towards the silhouette's rim (volume)."""
    rim = cv2.distanceTransform((mask > 127).astype(np.uint8), cv2.DIST_L2, 3)
    rim = 0.55 + 0.45 * np.minimum(rim / 14.0, 1.0)
    top = np.linspace(1.15, 0.8, COAT_H, dtype=np.float32)[:, None]
    return (rim * top)[..., None]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 BGR scene: ground and vegetation blotches, grass strokes, stones."""
    ground = rng.uniform(60, 150) * np.array(
        rng.uniform([0.6, 0.8, 0.9], [0.8, 1.0, 1.2]), np.float32
    )
    bush = rng.uniform(30, 110) * np.array(
        rng.uniform([0.5, 0.9, 0.6], [0.8, 1.2, 0.9]), np.float32
    )
    horizon = rng.uniform(0.35, 0.65) * height
    y = np.arange(height, dtype=np.float32)[:, None, None]
    mix = 1 / (1 + np.exp((y - horizon) / (0.05 * height)))
    scene = bush * mix + ground * (1 - mix) * np.ones((1, width, 1), np.float32)
    for cells in (8, 32):
        noise = rng.uniform(0.6, 1.4, (cells * height // width + 1, cells, 1)).astype(np.float32)
        scene = scene * cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)[..., None]
    scene = np.clip(scene, 0, 255)
    for _ in range(int(rng.integers(40, 90))):
        x, y0 = rng.uniform(0, width), rng.uniform(0, height)
        tip = (int(x + rng.uniform(-25, 25)), int(y0 - rng.uniform(15, 60)))
        colour = tuple(float(v) for v in bush * rng.uniform(0.6, 1.8))
        cv2.line(scene, (int(x), int(y0)), tip, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(3, 10))):
        centre = (int(rng.uniform(0, width)), int(rng.uniform(horizon, height)))
        axes = (int(rng.uniform(8, 40)), int(rng.uniform(5, 20)))
        cv2.ellipse(
            scene,
            centre,
            axes,
            0,
            0,
            360,
            tuple(float(v) for v in ground * rng.uniform(0.5, 1.5)),
            -1,
        )
    return scene


def _pose(rng: np.random.Generator, height: int, width: int, flank: str) -> np.ndarray:
    """3×3 homography from the canonical coat frame into the photo (the animal fills much
    of it)."""
    span = rng.uniform(0.8, 1.0) * width
    aspect = rng.uniform(1.0, 1.25) * COAT_H / COAT_W
    cx = width / 2 + rng.uniform(-0.5, 0.5) * (width - span)
    cy = height * rng.uniform(0.45, 0.6)
    half_w, half_h = span / 2, span * aspect / 2
    near = rng.uniform(0.8, 1.0)  # perspective: one end farther away
    left_scale, right_scale = (near, 1.0) if rng.random() < 0.5 else (1.0, near)
    dst = np.array(
        [
            [-half_w, -half_h * left_scale],
            [half_w, -half_h * right_scale],
            [half_w, half_h * right_scale],
            [-half_w, half_h * left_scale],
        ],
        np.float32,
    )
    angle = np.deg2rad(rng.uniform(-8, 8))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
    dst = dst @ rot.T + np.array([cx, cy], np.float32)
    src = np.array([[0, 0], [COAT_W, 0], [COAT_W, COAT_H], [0, COAT_H]], np.float32)
    if flank == "left":  # seen from the left, the animal faces left: mirror the canonical view
        src = src[[1, 0, 3, 2]]
    return cv2.getPerspectiveTransform(src, dst)


_NOISE_BANK: dict[tuple[int, int], np.ndarray] = {}


def _noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Unit Gaussian sensor noise: a random window of a fixed bank (drawing 1M normals per
    photo would dominate the generator's time)."""
    if (height, width) not in _NOISE_BANK:
        bank = np.random.default_rng(12345).standard_normal(
            (height + 64, width + 64, 3), dtype=np.float32
        )
        _NOISE_BANK[(height, width)] = bank
    y, x = rng.integers(0, 64, 2)
    return _NOISE_BANK[(height, width)][y : y + height, x : x + width]


def render_photo(
    coat: np.ndarray,
    shape: np.ndarray,
    flank: str,
    rng: np.random.Generator,
    height: int = 480,
    width: int = 640,
) -> np.ndarray:
    """One BGR uint8 photo of the animal with this coat."""
    scene = cv2.resize(
        _background(rng, height // 2, width // 2), (width, height), interpolation=cv2.INTER_LINEAR
    )
    # focused on the animal
    scene = cv2.GaussianBlur(scene, (0, 0), rng.uniform(0.5, 1.5) * width / 320)
    body = _body(rng, shape)
    homography = _pose(rng, height, width, flank)
    animal = cv2.warpPerspective(
        (coat * _shading(body)).clip(0, 255), homography, (width, height), flags=cv2.INTER_LINEAR
    )
    alpha = cv2.warpPerspective(body, homography, (width, height), flags=cv2.INTER_LINEAR)
    alpha = cv2.GaussianBlur(alpha, (3, 3), 0).astype(np.float32) * np.float32(1 / 255)
    image = cv2.blendLinear(scene, animal, 1 - alpha, alpha)
    if rng.random() < 0.5:  # occluding vegetation in front of the animal
        leaf = tuple(float(v) for v in rng.uniform([10, 40, 20], [60, 120, 70]))
        for _ in range(int(rng.integers(1, 5))):
            x0 = rng.uniform(0, width)
            points = np.stack(
                [
                    x0 + np.cumsum(rng.uniform(-30, 30, 6)),
                    np.linspace(height, rng.uniform(0, height), 6),
                ],
                1,
            )
            cv2.polylines(
                image, [points.astype(np.int32)], False, leaf, int(rng.integers(8, 30)), cv2.LINE_AA
            )
    mode = rng.choice(3, p=[0.55, 0.25, 0.2])  # day, flash (warm, vignetted), IR (grey)
    if mode >= 1:
        yy, xx = np.ogrid[:height, :width]
        r2 = ((xx - width / 2) / width) ** 2 + ((yy - height / 2) / height) ** 2
        vignette = (1.2 - rng.uniform(0.8, 1.6) * r2).astype(np.float32)
        image = image * vignette[..., None]
    if mode == 2:
        tint = np.array(rng.uniform([0.95, 0.95, 0.9], [1.1, 1.05, 1.0]), np.float32)
        image = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR) * tint
    exposure, black = rng.uniform(0.7, 1.4), rng.uniform(-12, 12)
    # saturates like a sensor
    image = cv2.addWeighted(image, exposure, image, 0.0, black, dtype=cv2.CV_8U)
    sigma = rng.uniform(0.0, 1.8)
    if sigma > 0.4:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    noisy = cv2.scaleAdd(_noise(rng, height, width), rng.uniform(2, 9), image.astype(np.float32))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def animal_shape(seed: int, animal: int) -> np.ndarray:
    return np.random.default_rng([seed, animal, 99]).uniform(0.9, 1.1, 3)
