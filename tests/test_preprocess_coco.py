"""COCO annotations (LeopardID2022 layout) and the wildlife-datasets CSV as preprocess input:
records, flanks, dates, rejections, splits, malformed files."""

import csv
import json
import pathlib

import cv2
import numpy as np
import pytest
from PIL import Image

from leopard_jax.data import records, synthetic
from leopard_jax.data import split as split_lib
from leopard_jax.preprocess import coco, inputs, pipeline
from leopard_jax.preprocess import config as preprocess_config

H, W = 120, 160  # synthetic photo size
RH, RW = 32, 64  # record size


def settings(input_path, output, **overrides):
    c = preprocess_config.get_config()
    c.input, c.output, c.workers = str(input_path), str(output), -1
    c.render.height, c.render.width = RH, RW
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


# (image id, file, [(annotation id, name or None, viewpoint, bbox or None)], date)
# Image 5 shows two animals side by side; image 6's file is missing; annotation 13 has only a
# segmentation polygon; annotation 16 has no name.
LAYOUT = [
    (1, "000000000001.jpg", [(11, "A000", "left", [10, 8, 120, 100])], "2016-03-13 17:31:58"),
    (2, "000000000002.jpg", [(12, "A000", "frontright", [30, 0, 130, 120])], "NA"),
    (3, "000000000003.jpg", [(13, "A001", "upleft", None)], "2016-03-14 06:00:00"),
    (4, "000000000004.jpg", [(14, "A001", "front", [40, 20, 100, 90])], ""),
    (
        5,
        "000000000005.jpg",
        [(15, "A002", "backleft", [0, 10, 150, 100]), (16, None, "right", [165, 5, 150, 110])],
        "2017-01-01 00:00:00",
    ),
    (6, "000000000006.jpg", [(17, "A002", "left", [0, 0, 50, 50])], "NA"),
]
SEGMENTATION_13 = [[20, 10, 140, 10, 140, 110, 20, 110]]  # box 20 10 140 110
WANT = {  # annotation -> (key, identity, flank, box, date)
    "11": ("A000/000000000001#0", "A000", "left", "10 8 130 108", "2016-03-13 17:31:58"),
    "12": ("A000/000000000002#0", "A000", "right", "30 0 160 120", ""),
    "13": ("A001/000000000003#0", "A001", "left", "20 10 140 110", "2016-03-14 06:00:00"),
    "14": ("A001/000000000004#0", "A001", "front", "40 20 140 110", ""),
    "15": ("A002/000000000005#0", "A002", "left", "0 10 150 110", "2017-01-01 00:00:00"),
    "16": ("unlabelled/000000000005#0", "", "right", "165 5 315 115", "2017-01-01 00:00:00"),
}


def leopard_coco(root: pathlib.Path, *, split_of=None) -> pathlib.Path:
    """`root/leopard.coco/{annotations/instances_train2022.json, images/train2022/}` with
    photos by the synthetic generator; returns the JSON's path."""
    base = root / "leopard.coco"
    folder = base / "images" / "train2022"
    folder.mkdir(parents=True)
    shots = [photo for *_, photo in synthetic.photos(6, 1, seed=3, height=H, width=W)]
    pictures = [shots[0], shots[1], shots[2], shots[4], np.hstack([shots[4], shots[5]])]
    for (_, file_name, _, _), picture in zip(LAYOUT, pictures):
        cv2.imwrite(str(folder / file_name), picture, [cv2.IMWRITE_JPEG_QUALITY, 95])
    images, annotations = [], []
    for image_id, file_name, anns, date in LAYOUT:
        images.append({"id": image_id, "file_name": file_name, "date_captured": date})
        for ann_id, name, viewpoint, bbox in anns:
            ann = {"id": ann_id, "image_id": image_id, "category_id": 0, "viewpoint": viewpoint}
            ann.update({"bbox": bbox} if bbox else {"segmentation": SEGMENTATION_13})
            ann.update({"name": name} if name else {})
            ann.update({"split": split_of(ann_id)} if split_of else {})
            annotations.append(ann)
    path = base / "annotations" / "instances_train2022.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return path


def by_annotation(output):
    return {row["annotation"]: row for row in records.read_manifest(output)}


def test_leopardid2022_layout_gives_records_flanks_dates_and_rejections(tmp_path):
    annotations = leopard_coco(tmp_path)
    out = tmp_path / "ds"
    summary = pipeline.run(settings(annotations, out), log=lambda m: None)  # no detector needed
    assert (summary.processed, summary.records, sum(summary.rejected.values())) == (7, 6, 1)
    rows = by_annotation(out)
    got = {a: (r["key"], r["identity"], r["flank"], r["box"], r["date"]) for a, r in rows.items()}
    assert got == WANT
    assert {a: r["viewpoint"] for a, r in rows.items()}["12"] == "frontright"
    assert records.load_settings(out)["detector"]["model"] == "none"

    (rejected,) = records.read_rejected(out)
    assert pathlib.Path(rejected["source"]).name == "000000000006.jpg"
    assert (rejected["identity"], rejected["reason"], rejected["annotation"]) == (
        "A002",
        "file not found",
        "17",
    )

    # Each record is its annotated box of the photo, not the photo: compare with Pillow.
    source = records.RecordSource(out)
    for i, row in enumerate(source.rows):
        box = tuple(int(v) for v in row["box"].split())
        photo = Image.open(row["source"]).convert("RGB")
        crop = np.asarray(photo.crop(box).resize((RW, RH), Image.BOX), np.float32)
        whole = np.asarray(photo.resize((RW, RH), Image.BOX), np.float32)
        rgb = source[i][..., :3].astype(np.float32)
        assert np.abs(rgb - crop).mean() < 4 < np.abs(rgb - whole).mean(), row["key"]
        assert Image.open(out / row["crop"]).size == (box[2] - box[0], box[3] - box[1])

    # A rerun has nothing left to do: the missing file's annotation counts as done.
    again = pipeline.run(settings(annotations, out), log=lambda m: None)
    assert (again.processed, again.skipped) == (0, 7)


def test_the_datasets_own_split_and_the_split_command(tmp_path):
    def own(ann_id):
        return "test" if ann_id in (13, 14) else "train"

    out = tmp_path / "ds"
    pipeline.run(settings(leopard_coco(tmp_path, split_of=own), out), log=lambda m: None)
    assert {a: r["split"] for a, r in by_annotation(out).items()} == {
        "11": "train",
        "12": "train",
        "13": "test",
        "14": "test",
        "15": "train",
        "16": "train",
    }
    assert split_lib.main(["--data", str(out)]) == 2  # the input's own split is kept...
    assert split_lib.main(["--data", str(out), "--overwrite", "--test-fraction", "0.4"]) == 0
    rows = [r for r in records.read_manifest(out) if r["identity"]]  # ...unless replaced
    sides = {s: {r["identity"] for r in rows if r["split"] == s} for s in ("train", "test")}
    assert sides["train"] and sides["test"] and not sides["train"] & sides["test"]
    assert split_lib.main(["--data", str(out), "--overwrite", "--closed-set"]) == 0
    rows = records.read_manifest(out)
    for identity in ("A000", "A001"):  # two records each: one on each side
        assert sorted(r["split"] for r in rows if r["identity"] == identity) == ["test", "train"]
    assert [r["split"] for r in rows if r["identity"] == "A002"] == ["train"]
    assert records.split_of_keys(out)["unlabelled/000000000005#0"] == ""


def test_wildlife_datasets_csv_gives_the_same_records(tmp_path):
    annotations = leopard_coco(tmp_path)
    root = annotations.parents[1]
    table = root / "metadata.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "identity", "path", "bbox", "viewpoint", "date"])
        for _, file_name, anns, date in LAYOUT:
            for ann_id, name, viewpoint, bbox in anns:
                bbox = bbox or [20.0, 10.0, 120.0, 100.0]  # wildlife-datasets computes it
                path = f"images/train2022/{file_name}"
                writer.writerow([ann_id, name or "unknown", path, str(bbox), viewpoint, date])
    from_coco, from_csv = tmp_path / "coco", tmp_path / "csv"
    pipeline.run(settings(annotations, from_coco), log=lambda m: None)
    pipeline.run(settings(table, from_csv), log=lambda m: None)
    a, b = records.RecordSource(from_coco), records.RecordSource(from_csv)
    keep = ("key", "identity", "flank", "box", "annotation", "viewpoint", "date", "source")
    assert [{k: r[k] for k in keep} for r in a.rows] == [{k: r[k] for k in keep} for r in b.rows]
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i], b[i])
    assert [r["annotation"] for r in records.read_rejected(from_csv)] == ["17"]


def test_boxes_from_a_detector_when_asked(tmp_path):
    """boxes=detector keeps the detection that matches each annotated box best."""
    from test_preprocess_models import constant_model

    rows = np.zeros((3 * 336, 8), np.float32)
    rows[10] = [64, 64, 64, 38.4, 0.9, 1, 0, 0]  # source 200×100: animal at (50, 20, 150, 80)
    model = constant_model(tmp_path / "md.onnx", "images", [1, 3, 128, 128], "output", rows[None])
    (tmp_path / "img").mkdir()
    Image.new("RGB", (200, 100), (90, 80, 70)).save(tmp_path / "img" / "a.jpg")
    anns = [
        {"id": 1, "image_id": 1, "name": "X", "bbox": [45, 15, 110, 70]},  # the animal, roughly
        {"id": 2, "image_id": 1, "name": "Y", "bbox": [0, 0, 40, 40]},  # nothing detected here
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": anns}))
    c = settings(path, tmp_path / "ds", images=str(tmp_path / "img"), boxes="detector")
    c.detector.model, c.min_image_side = model, 16
    pipeline.run(c, log=lambda m: None)
    (row,) = records.read_manifest(tmp_path / "ds")
    assert (row["identity"], row["box"], row["score"]) == ("X", "45 17 155 83", "0.9000")
    (rejected,) = records.read_rejected(tmp_path / "ds")
    assert rejected["reason"] == "no detection matches the annotated box (IoU >= 0.5)"
    with pytest.raises(pipeline.PreprocessError, match="boxes=detector needs a detector"):
        c = settings(path, tmp_path / "ds2", images=str(tmp_path / "img"), boxes="detector")
        pipeline.run(c, log=lambda m: None)  # the detector is "" here


def test_viewpoints_names_and_boxes():
    assert [
        inputs.flank_of_viewpoint(v)
        for v in (
            "left",
            "Right",
            "frontleft",
            "backright",
            "upfrontleft",
            "L",
            "front",
            "up",
            "NA",
            "",
        )
    ] == ["left", "right", "left", "right", "left", "left", "front", "up", "", ""]
    assert [inputs.identity_of(v) for v in ("A1", "____", "unknown", None, " nan ")] == [
        "A1",
        "",
        "",
        "",
        "",
    ]
    assert inputs.parse_box("[1.5, 2, 10, 20]", "x") == inputs.parse_box([1.5, 2, 10, 20], "x")
    assert inputs.parse_box("1.5 2 10 20", "x") == (1.5, 2.0, 11.5, 22.0)
    assert inputs.parse_box("", "x") is None and inputs.parse_box("nan", "x") is None
    assert coco.box_of({"segmentation": [[5, 6, 9, 6, 9, 20]]}, "x") == (5, 6, 9, 20)
    with pytest.raises(inputs.InputError, match="row 3: bbox"):
        inputs.parse_box([1, 2, 0, 5], "row 3")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"not valid JSON \(.* line 1 column 2\)"),
        (json.dumps({"images": []}), "no 'annotations' list"),
        (json.dumps({"images": [{"id": 1}], "annotations": []}), r"images\[0\] has no 'file_name'"),
        (
            json.dumps({"images": [], "annotations": [{"id": 5, "image_id": 1, "name": "A"}]}),
            r"annotations\[0\] \(id 5\): image_id 1 is not in 'images'",
        ),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.jpg"}],
                    "annotations": [{"id": 5, "image_id": 1, "name": "A", "bbox": [1, 2, 3]}],
                }
            ),
            r"annotations\[0\] \(id 5\): bbox \[1, 2, 3\] is not \[x, y, width, height\]",
        ),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.jpg"}],
                    "annotations": [{"id": 5, "image_id": 1, "name": "A"}],
                }
            ),
            r"annotations\[0\] \(id 5\): no 'bbox' and no polygon 'segmentation'",
        ),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.jpg"}],
                    "annotations": [{"id": 5, "image_id": 1, "individual": "A"}],
                }
            ),
            "no annotation has a 'name' field; set --config.identity_field",
        ),
    ],
)
def test_a_malformed_file_is_one_line_naming_the_file_and_field(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(inputs.InputError, match=message) as e:
        inputs.list_photos(path, images=tmp_path)
    assert str(e.value).startswith(f"--input {path}") and "\n" not in str(e.value)


def test_images_folder_is_found_or_asked_for(tmp_path):
    annotations = leopard_coco(tmp_path)
    assert coco.default_images_dir(annotations) == annotations.parents[1] / "images" / "train2022"
    elsewhere = tmp_path / "instances.json"
    elsewhere.write_text(annotations.read_text())
    with pytest.raises(inputs.InputError, match="give --images"):
        inputs.list_photos(elsewhere)
    with pytest.raises(inputs.InputError, match="--images .*nope: no such folder"):
        inputs.list_photos(elsewhere, images=tmp_path / "nope")
    photos = inputs.list_photos(elsewhere, images=annotations.parents[1] / "images" / "train2022")
    assert [p.annotation for p in photos] == ["11", "12", "13", "14", "15", "16", "17"]
