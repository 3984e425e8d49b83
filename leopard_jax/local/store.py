"""The local-feature store of a dataset: the one place that reads and writes it.

    DATASET_DIR/local_features/settings.json   extraction settings (max_keypoints, long_side,
                                               equalize, version)
    DATASET_DIR/local_features/part-*.npz      one file per batch of records:
        keys    str [n]            record keys (the manifest's `key`)
        counts  int32 [n]          keypoints per record (0: nothing to match on)
        xy      float32 [sum, 2]   keypoint positions in crop pixels, records one after another
        desc    float16 [sum, 128] RootSIFT descriptors (float16 halves the size; the
                                   matcher's ratio test does not notice the rounding)

Why parts: each is written under a temporary name and renamed, so an interrupted build
leaves whole parts only, and a rerun extracts just the records no part holds (resume).
Workers write their own parts, so extraction runs in parallel without a shared writer.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Sequence

import numpy as np

from leopard_jax.local import features

STORE_DIR = "local_features"
SETTINGS_FILE = "settings.json"


class StoreError(ValueError):
    """A missing or unusable feature store; the message names the command that builds it."""


def build_command(dataset_dir) -> str:
    return f"python -m leopard_jax.local --data {dataset_dir}"


def store_dir(dataset_dir) -> pathlib.Path:
    return pathlib.Path(dataset_dir) / STORE_DIR


def animal_mask(edge: np.ndarray | None, settings: dict) -> np.ndarray | None:
    """Where the animal is, or None (use the whole crop).

    Only a dataset made with background removal knows: its edge channel was computed on
    the background-removed image, so edges lie on the animal only. Closing and dilating
    them gives the animal's region (the rembg alpha itself is not kept in the dataset).
    """
    background = settings.get("background") or {}
    model = background.get("model", "none") if isinstance(background, dict) else background
    if edge is None or str(model).lower() in ("", "none"):
        return None
    import cv2

    size = max(3, (min(edge.shape[:2]) // 16) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    mask = cv2.morphologyEx((edge > 0).astype(np.uint8) * 255, cv2.MORPH_CLOSE, kernel)
    mask = cv2.dilate(mask, kernel)
    return mask if mask.any() else None


def extract_record(
    dataset_dir,
    row: dict[str, str],
    settings: dict,
    max_keypoints: int,
    long_side: int = features.LONG_SIDE,
    equalize: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints of one manifest row's crop (restricted to the animal when known)."""
    import cv2

    dataset_dir = pathlib.Path(dataset_dir)
    bgr = cv2.imread(str(dataset_dir / row["crop"]), cv2.IMREAD_COLOR)
    if bgr is None:
        raise StoreError(f"{dataset_dir / row['crop']}: unreadable crop; re-run preprocessing")
    edge = (
        cv2.imread(str(dataset_dir / row["edge"]), cv2.IMREAD_GRAYSCALE)
        if row.get("edge")
        else None
    )
    mask = animal_mask(edge, settings)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return features.extract(
        rgb, mask, max_keypoints=max_keypoints, long_side=long_side, equalize_histogram=equalize
    )


def write_part(directory: pathlib.Path, name: str, keys, xys, descs) -> None:
    """One part, atomically (temp file + rename)."""
    counts = np.array([len(x) for x in xys], np.int32)
    arrays = {
        "keys": np.asarray(list(keys), str),
        "counts": counts,
        "xy": np.concatenate([np.zeros((0, 2), np.float32), *xys]).astype(np.float32),
        "desc": np.concatenate(
            [np.zeros((0, features.DESCRIPTOR_DIMS), np.float32), *descs]
        ).astype(np.float16),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, directory / f"{name}.npz")
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def read_settings(dataset_dir) -> dict | None:
    path = store_dir(dataset_dir) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_settings(dataset_dir, settings: dict) -> None:
    directory = store_dir(dataset_dir)
    directory.mkdir(parents=True, exist_ok=True)
    old = read_settings(dataset_dir)
    if old is not None and old != settings:
        raise StoreError(
            f"{directory}: built with {old}, not {settings}; delete the folder to rebuild, "
            "or pass the same settings"
        )
    (directory / SETTINGS_FILE).write_text(json.dumps(settings, sort_keys=True))


def part_names(dataset_dir) -> list[pathlib.Path]:
    return sorted(store_dir(dataset_dir).glob("part-*.npz"))


def stored_keys(dataset_dir) -> set[str]:
    keys: set[str] = set()
    for path in part_names(dataset_dir):
        with np.load(path, allow_pickle=False) as npz:
            keys.update(npz["keys"].tolist())
    return keys


class Store:
    """Every record's keypoints of one dataset, by key."""

    def __init__(self, dataset_dir, parts: dict[str, tuple[np.ndarray, np.ndarray]], settings):
        self.dataset_dir = pathlib.Path(dataset_dir)
        self._by_key = parts
        self.settings = settings

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(xy float32 [n, 2], descriptors float32 [n, 128]) of one record."""
        if key not in self._by_key:
            raise StoreError(
                f"{store_dir(self.dataset_dir)}: no features for record {key!r}; "
                f"update the store with `{build_command(self.dataset_dir)}`"
            )
        xy, desc = self._by_key[key]
        return xy, desc.astype(np.float32)


def load(dataset_dir) -> Store:
    """The dataset's store; a one-line error naming the build command when there is none."""
    if not dataset_dir:
        raise StoreError(
            "the embeddings file records no dataset dir, so its local features cannot be found; "
            "embed with `python -m leopard_jax.embed --data DATASET_DIR`"
        )
    settings = read_settings(dataset_dir)
    if settings is None:
        raise StoreError(
            f"{dataset_dir}: no local feature store; build it with `{build_command(dataset_dir)}`"
        )
    by_key: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in part_names(dataset_dir):
        with np.load(path, allow_pickle=False) as npz:
            ends = np.cumsum(npz["counts"])
            xy, desc = np.split(npz["xy"], ends[:-1]), np.split(npz["desc"], ends[:-1])
            for key, x, d in zip(npz["keys"].tolist(), xy, desc):
                by_key[key] = (x, d)
    return Store(dataset_dir, by_key, settings)


def missing_rows(dataset_dir, rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    done = stored_keys(dataset_dir)
    return [row for row in rows if row["key"] not in done]
