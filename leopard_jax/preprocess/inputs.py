"""Which photos to process (identity folders, a CSV, an unlabelled folder, or a COCO file:
see coco.py) and how to decode one into plain RGB uint8, whatever its file format quirks.

A listed item is one animal to crop: a whole photo, or one annotated box in it (CSV `bbox`
column, COCO annotation), with the identity, flank, capture date and split it came with."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import pathlib
import re

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
_FLANK_RE = re.compile(r"^(?P<name>.+?)[_\-\s]+(?P<flank>left|right)$", re.IGNORECASE)
_FLANK_WORDS = {"l": "left", "left": "left", "r": "right", "right": "right"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._\-]+")
# Identities that mean "not identified": Wild Me's placeholder and wildlife-datasets' name.
UNNAMED = ("____", "unknown")
_NO_VALUE = ("", "na", "nan", "none", "null")  # empty cells as pandas and Wild Me write them


class InputError(ValueError):
    """The --input cannot be listed at all (wrong path, empty folder, bad CSV)."""


class ImageError(ValueError):
    """One photo cannot be used; the message becomes its reason in rejected.csv."""


@dataclasses.dataclass(frozen=True)
class Photo:
    source: str  # absolute path of the photo file
    identity: str  # "" when unknown
    flank: str  # "left" / "right" / "" / another viewpoint ("front", "up"...)
    name: str  # "<identity>/<stem>" or relative stem; the record key is built from it
    box: tuple[float, float, float, float] | None = None  # annotated x0 y0 x1 y1, source px
    annotation: str = ""  # which annotation of the photo; (source, annotation) is resumed on
    viewpoint: str = ""  # as annotated
    date: str = ""  # capture date as given
    split: str = ""  # the input's own split


def parse_flank(identity: str) -> str:
    """`BGL09_right` / `CUL66_Left` -> the flank word; "" when the name carries none."""
    match = _FLANK_RE.match(identity.strip())
    return match.group("flank").lower() if match else ""


def normalise_flank(value: str) -> str:
    return _FLANK_WORDS.get(value.strip().lower(), "")


def flank_of_viewpoint(viewpoint: str) -> str:
    """`left`, `frontleft`, `upbackright` -> the flank seen; any other viewpoint (`front`,
    `up`) is kept, lower case, so it can be filtered; "" when there is none."""
    value = viewpoint.strip().lower()
    if value in _NO_VALUE:
        return ""
    if value in _FLANK_WORDS:
        return _FLANK_WORDS[value]
    sides = [side for side in ("left", "right") if side in value]
    return sides[0] if len(sides) == 1 else value


def clean(value) -> str:
    """A cell or JSON value as text; "" for the ways files spell "nothing"."""
    text = "" if value is None else str(value).strip()
    return "" if text.lower() in _NO_VALUE else text


def identity_of(value) -> str:
    name = clean(value)
    return "" if name in UNNAMED else name


def parse_box(value, where: str) -> tuple[float, float, float, float] | None:
    """COCO's `[x, y, width, height]` (a list, or text like `[x, y, w, h]` / `x y w h`) ->
    (x0, y0, x1, y1); None when empty. Raises InputError naming `where` for anything else."""
    if isinstance(value, str):
        text = value.strip().strip("[]()").strip()
        if clean(text) == "":
            return None
        value = re.split(r"[,\s]+", text)
    try:
        x, y, w, h = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: bbox {value!r} is not [x, y, width, height]") from None
    if not all(map(math.isfinite, (x, y, w, h))) or not (w > 0 and h > 0):
        raise InputError(f"{where}: bbox {value!r} needs a positive width and height")
    return x, y, x + w, y + h


def safe_name(text: str) -> str:
    """One filesystem- and URL-path-safe path component (the key is also a file name)."""
    cleaned = _UNSAFE.sub("_", text).strip("._")
    return cleaned or "_"


def _is_image(path: pathlib.Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_under(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        p
        for p in folder.rglob("*")
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
        photos.append(
            Photo(os.path.abspath(path), identity, parse_flank(identity), _stem_name(rel))
        )
    return photos


def _csv_rows(csv_path: pathlib.Path) -> tuple[dict[str, int], list[list[str]]]:
    """(column -> index, data rows); without a header, the columns are path,identity,flank."""
    with open(csv_path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise InputError(
            f"--input {csv_path}: the CSV has no rows; expected `path,identity[,flank]`"
        )
    header = [cell.strip().lower() for cell in rows[0]]
    if "path" not in header:
        return {"path": 0, "identity": 1, "flank": 2}, rows
    return {name: header.index(name) for name in header}, rows[1:]


def list_csv(csv_path: pathlib.Path, images: str | os.PathLike | None = None) -> list[Photo]:
    """Rows `path,identity[,flank]` (header optional, extra columns ignored), or the
    wildlife-datasets table (`image_id, identity, path, bbox, viewpoint`, optional `date`,
    `split`): one item per row, cropped to its `bbox` when it has one. Relative paths are
    relative to `images` (default: the CSV's folder). Missing files are listed: they get
    rejected."""
    col, rows = _csv_rows(csv_path)
    base = pathlib.Path(images) if images else csv_path.parent
    photos = []
    for n, row in enumerate(rows, start=1):
        cell = {name: row[i].strip() if i < len(row) else "" for name, i in col.items()}.get
        path = pathlib.Path(cell("path", ""))
        path = path if path.is_absolute() else base / path
        identity = identity_of(cell("identity"))
        viewpoint = clean(cell("viewpoint") or cell("orientation"))
        flank = normalise_flank(cell("flank", "")) or flank_of_viewpoint(viewpoint)
        prefix = safe_name(identity) if identity else "unlabelled"
        photos.append(
            Photo(
                os.path.abspath(path),
                identity,
                flank or parse_flank(identity),
                f"{prefix}/{safe_name(path.stem)}",
                box=parse_box(cell("bbox", ""), f"--input {csv_path}, data row {n}"),
                annotation=clean(cell("image_id")),
                viewpoint=viewpoint,
                date=clean(cell("date")),
                split=clean(cell("split") or cell("original_split")),
            )
        )
    return photos


def list_photos(
    input_path: str | os.PathLike,
    labels: str = "auto",
    *,
    images: str | os.PathLike | None = None,
    identity_field: str = "name",
    split_field: str = "split",
) -> list[Photo]:
    """All items named by --input, with identity, flank and a unique key name each.

    `images` is where a CSV's relative paths or a COCO file's `file_name`s live;
    `identity_field` and `split_field` name a COCO annotation's fields."""
    path = pathlib.Path(input_path)
    if labels not in ("auto", "folders", "none"):
        raise InputError(f"labels={labels!r}: use auto, folders or none")
    if not path.exists():
        raise InputError(
            f"--input {path}: no such file or folder; give a folder of photos or a CSV"
        )
    if path.is_file() and path.suffix.lower() == ".json":
        from leopard_jax.preprocess import coco  # coco.py builds on this module

        photos = coco.list_coco(
            path, images, identity_field=identity_field, split_field=split_field
        )
    elif path.is_file():
        if path.suffix.lower() != ".csv":
            raise InputError(
                f"--input {path}: a file must be a CSV (path,identity[,flank]) or a COCO .json; "
                "or give its folder"
            )
        photos = list_csv(path, images)
    else:
        photos = list_folder(path, labels)
        if not photos:
            raise InputError(
                f"--input {path}: no photos found (looked for {', '.join(IMAGE_SUFFIXES)}); "
                "check the path"
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
