"""Synthetic spotted-animal photos: layout, determinism, and not trivially matchable."""

import subprocess
import sys

import cv2
import numpy as np

from leopard_jax.data import synthetic, synthetic_scene

H, W = 96, 128


def test_identity_folders_pair_flanks_of_one_animal():
    names = synthetic.identity_names(5)
    assert [n[0] for n in names] == [
        "A000_left",
        "A000_right",
        "A001_left",
        "A001_right",
        "A002_left",
    ]
    assert [n[2] for n in names] == ["left", "right"] * 2 + ["left"]


def test_deterministic_per_seed_and_photos_differ():
    a = list(synthetic.identity_photos(1, 3, seed=0, height=H, width=W))
    b = list(synthetic.identity_photos(1, 3, seed=0, height=H, width=W))
    c = list(synthetic.identity_photos(1, 3, seed=1, height=H, width=W))
    for (_, _, stem_a, x), (_, _, stem_b, y), (_, _, _, z) in zip(a, b, c):
        assert stem_a == stem_b and x.shape == (H, W, 3) and x.dtype == np.uint8
        np.testing.assert_array_equal(x, y)
        assert np.abs(x.astype(int) - z).mean() > 5
    assert np.abs(a[0][3].astype(int) - a[1][3]).mean() > 5, "photos of one identity should vary"


def test_coat_style_belongs_to_the_animal():
    """Both flanks of an animal share its coat traits (mark spacing, size, colour); other
    animals differ, so the traits are a cue that carries over to unseen individuals."""
    a0, a1 = synthetic_scene.coat_style(0, 0), synthetic_scene.coat_style(0, 1)
    assert a0 == synthetic_scene.coat_style(0, 0)
    assert all(a0[k] != a1[k] for k in a0)
    coarse = synthetic_scene.draw_coat(
        np.random.default_rng(1), {**a0, "spacing": 56.0, "size": 0.45}
    )
    fine = synthetic_scene.draw_coat(
        np.random.default_rng(1), {**a0, "spacing": 18.0, "size": 0.22}
    )

    # Fewer, bigger marks: fewer dark blobs on the canonical coat.
    def blobs(coat):
        dark = (cv2.cvtColor(coat, cv2.COLOR_BGR2GRAY) < 60).astype(np.uint8)
        return cv2.connectedComponents(dark)[0]

    assert blobs(coarse) < blobs(fine) / 2


def test_raw_pixel_nearest_neighbour_is_far_from_perfect():
    """Pose, scene and lighting vary enough that raw pixels rarely find the same animal."""
    items = list(synthetic.photos(12, 3, seed=0, height=H, width=W))
    ids = np.array([i for i, *_ in items])
    vectors = np.stack(
        [
            cv2.resize(p, (64, 32), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
            for *_, p in items
        ]
    )
    vectors -= vectors.mean(1, keepdims=True)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    top1 = (ids[similarity.argmax(1)] == ids).mean()
    assert top1 < 0.5, top1


def test_cli_writes_the_same_jpegs_with_worker_processes(tmp_path):
    assert synthetic.write_photos(tmp_path / "a", 3, 2, seed=4, height=H, width=W) == 6
    cmd = [
        sys.executable,
        "-m",
        "leopard_jax.data.synthetic",
        "--out",
        str(tmp_path / "b"),
        "--identities",
        "3",
        "--images-per-identity",
        "2",
        "--seed",
        "4",
        "--height",
        str(H),
        "--width",
        str(W),
        "--workers",
        "2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "wrote 6 photos" in done.stdout
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert [str(f) for f in files[:2]] == [
        "A000_left/A000_left_000.jpg",
        "A000_left/A000_left_001.jpg",
    ]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert not list((tmp_path / "b").rglob("*.tmp"))

    bad = subprocess.run([*cmd[:6], "0"], capture_output=True, text=True)  # --identities 0
    assert bad.returncode == 2 and "must be >= 1" in bad.stderr
