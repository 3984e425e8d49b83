"""Items from a COCO-style annotation file, as Wild Me publishes its re-identification sets
(LeopardID2022 on LILA: `leopard.coco/annotations/instances_train2022.json` beside
`leopard.coco/images/train2022/`).

One item per annotation: its `bbox` (else the bounds of its `segmentation` polygons) is the
crop, its `name` (or another field) the identity, its `viewpoint` the flank; the image gives
the file and `date_captured`. Images without annotations are not listed. Wild Me writes
`____` for an animal not identified: such annotations are unlabelled items.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from leopard_jax.preprocess import inputs


def default_images_dir(json_path: pathlib.Path) -> pathlib.Path | None:
    """`X.coco/annotations/instances_train2022.json` -> `X.coco/images/train2022`, when it
    exists."""
    stem = json_path.stem
    if json_path.parent.name != "annotations" or not stem.startswith("instances_"):
        return None
    folder = json_path.parent.parent / "images" / stem.removeprefix("instances_")
    return folder if folder.is_dir() else None


def _load(json_path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(json_path.read_bytes())
    except json.JSONDecodeError as e:
        raise inputs.InputError(
            f"--input {json_path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except UnicodeDecodeError as e:
        raise inputs.InputError(f"--input {json_path}: not UTF-8 text ({e.reason})") from None
    for field in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(field), list):
            raise inputs.InputError(
                f"--input {json_path}: no '{field}' list; a COCO file has 'images' and "
                "'annotations' lists"
            )
    return data


def _images_by_id(json_path: pathlib.Path, images: list) -> dict[Any, Mapping[str, Any]]:
    by_id = {}
    for i, image in enumerate(images):
        for field in ("id", "file_name"):
            if not isinstance(image, dict) or field not in image:
                raise inputs.InputError(f"--input {json_path}: images[{i}] has no '{field}'")
        by_id[image["id"]] = image
    return by_id


def box_of(annotation: Mapping[str, Any], where: str) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) from `bbox`, else from the bounds of the `segmentation` polygons."""
    box = inputs.parse_box(annotation.get("bbox") or "", where)
    if box is not None:
        return box
    polygons = annotation.get("segmentation")
    if isinstance(polygons, list) and polygons and isinstance(polygons[0], (int, float)):
        polygons = [polygons]  # one polygon written without its enclosing list
    try:
        xs = [float(v) for poly in polygons for v in poly[0::2]]
        ys = [float(v) for poly in polygons for v in poly[1::2]]
    except (TypeError, ValueError, KeyError):
        xs = ys = []
    if not xs or not ys or max(xs) <= min(xs) or max(ys) <= min(ys):
        raise inputs.InputError(
            f"{where}: no 'bbox' and no polygon 'segmentation' to take the box from; add a bbox"
        )
    return min(xs), min(ys), max(xs), max(ys)


def list_coco(
    json_path: str | os.PathLike,
    images: str | os.PathLike | None = None,
    *,
    identity_field: str = "name",
    split_field: str = "split",
) -> list[inputs.Photo]:
    """One item per annotation, in file order. `images` is the folder the `file_name`s are
    relative to (default: the LeopardID2022 layout's). `split_field` names the annotation
    (or image) field holding the dataset's own split; absent, the items have none."""
    json_path = pathlib.Path(json_path)
    if images:
        folder = pathlib.Path(images)
        if not folder.is_dir():
            raise inputs.InputError(f"--images {folder}: no such folder; give the photos' folder")
    else:
        folder = default_images_dir(json_path)
        if folder is None:
            raise inputs.InputError(
                f"--input {json_path}: give --images, the folder its file_names are relative to"
            )
    data = _load(json_path)
    by_id = _images_by_id(json_path, data["images"])
    annotations = data["annotations"]
    if not annotations:
        raise inputs.InputError(f"--input {json_path}: 'annotations' is empty; nothing to crop")
    if not any(isinstance(a, dict) and identity_field in a for a in annotations):
        raise inputs.InputError(
            f"--input {json_path}: no annotation has a '{identity_field}' field; set "
            "--config.identity_field to the field naming the individual"
        )
    photos = []
    for i, ann in enumerate(annotations):
        where = f"--input {json_path}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise inputs.InputError(f"{where} is not an object")
        where += f" (id {ann['id']})" if "id" in ann else ""
        image = by_id.get(ann.get("image_id"))
        if image is None:
            raise inputs.InputError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        file_name = pathlib.PurePosixPath(str(image["file_name"]))
        identity = inputs.identity_of(ann.get(identity_field))
        viewpoint = inputs.clean(ann.get("viewpoint"))
        prefix = inputs.safe_name(identity) if identity else "unlabelled"
        split = ann.get(split_field, image.get(split_field)) if split_field else ""
        photos.append(
            inputs.Photo(
                source=os.path.abspath(folder / file_name),
                identity=identity,
                flank=inputs.flank_of_viewpoint(viewpoint),
                name=f"{prefix}/{inputs.safe_name(file_name.stem)}",
                box=box_of(ann, where),
                annotation=str(ann.get("id", i)),
                viewpoint=viewpoint,
                date=inputs.clean(image.get("date_captured")),
                split=inputs.clean(split),
            )
        )
    return photos
