"""A small embeddings.npz with real JPEG crops and edges, for tests and for trying the page.

Each synthetic individual is a fixed pattern of dark spots on a tan coat; its images are
that pattern shifted a little, and its embeddings a shared direction plus noise, so the
most similar candidates of an image are mostly its own individual — as with a trained model.
"""

from __future__ import annotations

import pathlib

import cv2
import numpy as np

from leopard_jax import embeddings_io


def _coat(rng: np.random.Generator, height: int, width: int) -> list[tuple[int, int, int]]:
    return [
        (int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(3, 8)))
        for _ in range(40)
    ]


def _render(spots, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    image = np.full((height, width, 3), (90, 160, 200), np.uint8)  # BGR tan
    dx, dy = rng.integers(-4, 5, size=2)
    for x, y, r in spots:
        cv2.circle(image, (int(x + dx), int(y + dy)), r, (30, 40, 50), -1)
    return cv2.GaussianBlur(image, (3, 3), 0)


def write_synthetic(
    out_dir: str | pathlib.Path,
    individuals: int = 4,
    per_individual: int = 3,
    dims: int = 16,
    noise: float = 0.35,
    seed: int = 0,
    height: int = 64,
    width: int = 128,
) -> pathlib.Path:
    """Writes OUT/embeddings.npz plus OUT/{photos,crops,edges}/*.jpg; returns the npz path."""
    out = pathlib.Path(out_dir)
    for sub in ("photos", "crops", "edges"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = {name: [] for name in embeddings_io.STRING_FIELDS}
    embeddings = []
    for ind in range(individuals):
        centre = rng.normal(size=dims)
        spots = _coat(rng, height, width)
        for j in range(per_individual):
            key = f"ind{ind:02d}_img{j}"
            crop = _render(spots, rng, height, width)
            edge = cv2.Canny(cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY), 55, 160)
            photo = cv2.copyMakeBorder(
                crop, 16, 16, 16, 16, cv2.BORDER_CONSTANT, value=(60, 90, 70)
            )
            paths = {sub: out / sub / f"{key}.jpg" for sub in ("photos", "crops", "edges")}
            for sub, image in (("photos", photo), ("crops", crop), ("edges", edge)):
                cv2.imwrite(str(paths[sub]), image)
            rows["keys"].append(key)
            rows["paths"].append(str(paths["photos"].resolve()))
            rows["identities"].append(f"ind{ind:02d}")
            rows["flanks"].append("left" if j % 2 == 0 else "right")
            rows["crops"].append(str(paths["crops"].resolve()))
            rows["edges"].append(str(paths["edges"].resolve()))
            vector = centre + noise * np.linalg.norm(centre) * rng.normal(size=dims) / np.sqrt(dims)
            embeddings.append(vector / np.linalg.norm(vector))
    npz = out / "embeddings.npz"
    embeddings_io.write(
        npz,
        embeddings_io.make(
            np.asarray(embeddings, np.float32), meta={"model": "synthetic", "version": 1}, **rows
        ),
    )
    return npz
