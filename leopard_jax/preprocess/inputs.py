"""Which photos to process (identity folders, a CSV, or an unlabelled folder) and how to
decode one into plain RGB uint8, whatever its file format quirks."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import pathlib
import re

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
_FLANK_RE = re.compile(r"^(?P<name>.+?)[_\-\s]+(?P<flank>left|right)$", re.IGNORECASE)
_FLANK_WORDS = {"l": "left", "left": "left", "r": "right", "right": "right"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._\-]+")


class InputError(ValueError):
    """The --input cannot be listed at all (wrong path, empty folder, bad CSV)."""


class ImageError(ValueError):
    """One photo cannot be used; the message becomes its reason in rejected.csv."""


@dataclasses.dataclass(frozen=True)
class Photo:
    source: str  # absolute path: what a resumed run compares against
    identity: str  # "" when unknown
    flank: str  # "left" / "right" / ""
    name: str  # "<identity>/<stem>" or relative stem; the record key is built from it


def parse_flank(identity: str) -> str:
    """`BGL09_right` / `CUL66_Left` -> the flank word; "" when the name carries none."""
    match = _FLANK_RE.match(identity.strip())
    return match.group("flank").lower() if match else ""


def normalise_flank(value: str) -> str:
    return _FLANK_WORDS.get(value.strip().lower(), "")


def safe_name(text: str) -> str:
    """One filesystem- and URL-path-safe path component (the key is also a file name)."""
    cleaned = _UNSAFE.sub("_", text).strip("._")
    return cleaned or "_"


def _is_image(path: pathlib.Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_under(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        p for p in folder.rglob("*")
        if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _stem_name(rel: pathlib.Path) -> str:
    parts = [safe_name(p) for p in rel.parent.parts] + [safe_name(rel.stem)]
    return "/".join(parts)


def list_folder(folder: pathlib.Path, labels: str = "auto") -> list[Photo]:
    """Identity folders `<ID>/<image>` (labels="folders") or any tree of photos
    (labels="none"). "auto" reads identity folders when no photo sits at the top level."""
    images = _images_under(folder)
    if labels == "auto":
        labels = "none" if any(p.parent == folder for p in images) else "folders"
    photos = []
    for path in images:
        rel = path.relative_to(folder)
        identity = rel.parts[0] if labels == "folders" and len(rel.parts) > 1 else ""
        photos.append(Photo(os.path.abspath(path), identity, parse_flank(identity), _stem_name(rel)))
    return photos


def list_csv(csv_path: pathlib.Path) -> list[Photo]:
    """Rows `path,identity[,flank]` (header optional, extra columns ignored); relative
    paths are relative to the CSV's folder. Missing files are listed: they get rejected."""
    with open(csv_path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise InputError(f"--input {csv_path}: the CSV has no rows; expected `path,identity[,flank]`")
    header = [cell.strip().lower() for cell in rows[0]]
    if "path" in header:
        col = {name: header.index(name) for name in ("path", "identity", "flank") if name in header}
        rows = rows[1:]
    else:
        col = {"path": 0, "identity": 1, "flank": 2}
    photos = []
    for row in rows:
        cell = lambda name: row[col[name]].strip() if name in col and col[name] < len(row) else ""  # noqa: E731
        path = pathlib.Path(cell("path"))
        path = path if path.is_absolute() else csv_path.parent / path
        identity = cell("identity")
        flank = normalise_flank(cell("flank")) or parse_flank(identity)
        prefix = safe_name(identity) if identity else "unlabelled"
        photos.append(Photo(os.path.abspath(path), identity, flank, f"{prefix}/{safe_name(path.stem)}"))
    return photos


def list_photos(input_path: str | os.PathLike, labels: str = "auto") -> list[Photo]:
    """All photos named by --input, with identity, flank and a unique key name each."""
    path = pathlib.Path(input_path)
    if labels not in ("auto", "folders", "none"):
        raise InputError(f"labels={labels!r}: use auto, folders or none")
    if not path.exists():
        raise InputError(f"--input {path}: no such file or folder; give a folder of photos or a CSV")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise InputError(f"--input {path}: a file must be a CSV (path,identity[,flank]); or give its folder")
        photos = list_csv(path)
    else:
        photos = list_folder(path, labels)
        if not photos:
            raise InputError(
                f"--input {path}: no photos found (looked for {', '.join(IMAGE_SUFFIXES)}); check the path"
            )
    return unique_names(photos)


def unique_names(photos: list[Photo], taken: set[str] = frozenset()) -> list[Photo]:
    """Suffix `~2`, `~3`... to names that collide (a.jpg and a.png) or are already `taken`."""
    seen = set(taken)
    out = []
    for photo in photos:
        name, n = photo.name, 1
        while name in seen:
            n += 1
            name = f"{photo.name}~{n}"
        seen.add(name)
        out.append(dataclasses.replace(photo, name=name))
    return out


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> RGB uint8; alpha is composited over black (as removed background)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        grey = np.asarray(image, dtype=np.uint16).astype(np.float32) / 257.0
        return np.repeat(np.clip(grey + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    if image.mode in ("I", "F"):
        grey = np.asarray(image, dtype=np.float64)
        lo, hi = float(np.min(grey)), float(np.max(grey))
        grey = (grey - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(grey)
        return np.repeat(np.clip(grey + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_image(path: str | os.PathLike, min_side: int = 32) -> np.ndarray:
    """Decode a photo to RGB uint8 H×W×3 with its EXIF orientation applied.

    Raises ImageError with a reason a person can act on (rejected.csv shows it).
    """
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except PermissionError:
        raise ImageError("permission denied: cannot read the file (fix with chmod a+r)") from None
    except IsADirectoryError:
        raise ImageError("is a folder, not a photo") from None
    except OSError as e:
        raise ImageError(f"cannot read the file: {e.strerror or e}") from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: truncated/corrupt data fails here, not later
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except Image.DecompressionBombError as e:
        raise ImageError(f"too large to decode safely ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (unknown format)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"corrupt or truncated image ({e})") from None
    height, width = rgb.shape[:2]
    if min(height, width) < min_side:
        raise ImageError(f"too small ({width}x{height} px; minimum side is {min_side})")
    return np.ascontiguousarray(rgb)
