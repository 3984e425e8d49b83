"""Listing photos, decoding awkward files, the edge channel and rendering."""

import io
import pathlib

import cv2
import numpy as np
import pytest
from PIL import Image

from leopard_jax.preprocess import edges, inputs, render


def save(path, array, **kwargs):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_identity_folders_flanks_and_unique_names(tmp_path):
    for name in (
        "BGL09_right/a.jpg",
        "BGL09_right/a.png",
        "CUL66_Left/b c.jpg",
        "X 1/c.JPG",
        "X 1/notes.txt",
        "X 1/.hidden.jpg",
    ):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    photos = inputs.list_photos(tmp_path)
    got = [
        (pathlib.Path(p.source).relative_to(tmp_path).as_posix(), p.identity, p.flank, p.name)
        for p in photos
    ]
    assert got == [
        ("BGL09_right/a.jpg", "BGL09_right", "right", "BGL09_right/a"),
        ("BGL09_right/a.png", "BGL09_right", "right", "BGL09_right/a~2"),
        ("CUL66_Left/b c.jpg", "CUL66_Left", "left", "CUL66_Left/b_c"),
        ("X 1/c.JPG", "X 1", "", "X_1/c"),
    ]
    # A photo at the top level makes "auto" read the folder as unlabelled.
    (tmp_path / "top.jpg").write_bytes(b"x")
    assert {p.identity for p in inputs.list_photos(tmp_path)} == {""}
    assert {p.identity for p in inputs.list_photos(tmp_path, labels="folders")} == {
        "",
        "BGL09_right",
        "CUL66_Left",
        "X 1",
    }


def test_csv_listing(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "labels.csv").write_text(
        "path,identity,park,flank\npics/1.jpg,YF27,Yala,L\n/abs/2.jpg,BRL17_Left,,\npics/3.jpg,,,\n"
    )
    photos = inputs.list_photos(tmp_path / "labels.csv")
    assert [(p.source, p.identity, p.flank, p.name) for p in photos] == [
        (str(tmp_path / "pics/1.jpg"), "YF27", "left", "YF27/1"),
        ("/abs/2.jpg", "BRL17_Left", "left", "BRL17_Left/2"),
        (str(tmp_path / "pics/3.jpg"), "", "", "unlabelled/3"),
    ]
    (tmp_path / "plain.csv").write_text("pics/1.jpg,A_right\n")
    assert [(p.identity, p.flank) for p in inputs.list_photos(tmp_path / "plain.csv")] == [
        ("A_right", "right")
    ]


def test_listing_errors_are_one_line(tmp_path):
    with pytest.raises(inputs.InputError, match="no such file or folder") as e:
        inputs.list_photos(tmp_path / "typo")
    assert "\n" not in str(e.value)
    with pytest.raises(inputs.InputError, match="no photos found"):
        inputs.list_photos(tmp_path)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(inputs.InputError, match="no rows"):
        inputs.list_photos(tmp_path / "empty.csv")


def test_exif_orientation_is_applied(tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = save(tmp_path / "o.jpg", rgb, exif=exif.tobytes(), quality=95)
    out = inputs.load_image(path, min_side=1)
    assert out.shape == (40, 20, 3)
    assert out[:15].mean() > 200 and out[25:].mean() < 50  # the white half is now on top


def test_modes_grey_cmyk_alpha_16bit(tmp_path):
    grey = save(tmp_path / "g.png", np.full((40, 40), 77, np.uint8))
    np.testing.assert_array_equal(inputs.load_image(grey), np.full((40, 40, 3), 77))
    cmyk = tmp_path / "c.jpg"
    Image.fromarray(noise(40, 40)).convert("CMYK").save(cmyk)
    out = inputs.load_image(cmyk)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:20, :, 3] = 255  # top half opaque, bottom transparent
    out = inputs.load_image(save(tmp_path / "a.png", rgba))
    assert (out[:20] == 200).all() and (out[20:] == 0).all()
    deep = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    np.testing.assert_allclose(
        inputs.load_image(tmp_path / "d.png")[..., 0], deep / 257.0, atol=0.6
    )
    deep_rgb = np.stack([deep, deep // 2, deep // 4], -1)
    cv2.imwrite(str(tmp_path / "d.tif"), deep_rgb[..., ::-1])
    np.testing.assert_allclose(inputs.load_image(tmp_path / "d.tif"), deep_rgb / 257.0, atol=1.0)


def test_bad_files_give_reasons(tmp_path):
    good = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(good, format="JPEG")
    cases = {
        "empty.jpg": (b"", "empty file"),
        "text.jpg": (b"hello, not a photo", "not an image"),
        "cut.jpg": (good.getvalue()[: len(good.getvalue()) // 2], "truncated"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(inputs.ImageError, match=reason):
            inputs.load_image(tmp_path / name)
    with pytest.raises(inputs.ImageError, match="too small"):
        inputs.load_image(save(tmp_path / "dot.png", np.zeros((1, 1, 3), np.uint8)))
    with pytest.raises(inputs.ImageError, match="not found"):
        inputs.load_image(tmp_path / "gone.jpg")


def disk(value_in, value_out, size=(120, 160), radius=35):
    yy, xx = np.mgrid[: size[0], : size[1]]
    inside = (yy - size[0] / 2) ** 2 + (xx - size[1] / 2) ** 2 < radius**2
    image = np.where(inside, value_in, value_out).astype(np.uint8)
    return np.repeat(image[..., None], 3, -1), np.sqrt(
        (yy - size[0] / 2) ** 2 + (xx - size[1] / 2) ** 2
    )


def test_edges_follow_the_boundary():
    rgb, dist = disk(220, 30)
    edge = edges.edge_map(rgb)
    assert edge.dtype == np.uint8 and set(np.unique(edge)) == {0, 255}
    assert np.abs(dist[edge > 0] - 35).max() <= 2.5  # only on the circle
    assert (edge > 0).sum() > 0.8 * 2 * np.pi * 35  # and all around it


def test_equalisation_lifts_low_contrast_rosettes():
    rgb, _ = disk(110, 100)  # a step of 10 grey levels: below Canny's 55
    assert edges.edge_map(rgb, equalize=False).max() == 0
    assert edges.edge_map(rgb, equalize=True).max() == 255
    with pytest.raises(ValueError, match="odd"):
        edges.edge_map(rgb, blur_ksize=4)


def test_render_stretch_and_letterbox():
    rgb = np.full((100, 100, 3), (10, 20, 30), np.uint8)
    edge = np.full((100, 100), 255, np.uint8)
    out = render.render(rgb, edge, 64, 128, "stretch")
    assert out.shape == (64, 128, 4) and out.dtype == np.uint8
    assert (out == np.array([10, 20, 30, 255])).all()
    boxed = render.render(rgb, edge, 64, 128, "letterbox", pad_value=0)
    assert (boxed[:, 32:96] == np.array([10, 20, 30, 255])).all()
    assert (boxed[:, :32] == 0).all() and (boxed[:, 96:] == 0).all()
    with pytest.raises(ValueError, match="mode"):
        render.render(rgb, edge, 64, 128, "crop")


def test_thin_edges_survive_downscaling():
    edge = np.zeros((400, 800), np.uint8)
    edge[::40, :] = 255  # 1-px lines, 10 of them
    out = render.render(np.zeros((400, 800, 3), np.uint8), edge, 100, 200)[..., 3]
    assert (out.max(axis=1) > 0).sum() >= 10
