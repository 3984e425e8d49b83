"""Augmentation: shared geometry on all channels, RGB-only jitter, normalisation."""

import cv2
import numpy as np
import pytest

from leopard_jax.data import augment

H, W = 48, 96


def _blobs(seed):
    rng = np.random.default_rng(seed)
    image = np.zeros((H, W), np.uint8)
    for _ in range(25):
        cv2.circle(
            image,
            (int(rng.integers(0, W)), int(rng.integers(0, H))),
            int(rng.integers(2, 6)),
            int(rng.integers(80, 256)),
            -1,
        )
    return image


def test_normalize_matches_per_channel_formula():
    image = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 4), dtype=np.uint8)
    mean = [0.485, 0.456, 0.406, 0.456]
    std = [0.229, 0.224, 0.225, 0.225]
    out = augment.normalize(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    for c in range(4):
        np.testing.assert_allclose(
            out[..., c], (image[..., c] / 255.0 - mean[c]) / std[c], rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match="4 channels"):
        augment.normalize(image[..., :3])


def test_all_channels_share_the_geometry():
    """Four identical channels stay identical after augmentation without jitter."""
    pattern = _blobs(1)
    image = np.dstack([pattern] * 4)
    config = augment.AugmentConfig(brightness=0, contrast=0, saturation=0)
    for seed in range(5):
        out = augment.augment(image, np.random.default_rng(seed), config)
        for c in range(1, 4):
            np.testing.assert_array_equal(out[..., c], out[..., 0])
        assert np.abs(out[..., 0].astype(int) - pattern).mean() > 1.0, "geometry did nothing"


def test_geometry_moves_a_point_where_rotation_then_crop_puts_it():
    """Independent reference: rotate a pixel about the centre by hand, crop, rescale."""
    rotate_deg, crop = 10.0, 0.1
    for seed in range(5):
        rng = np.random.default_rng(seed)
        angle = rng.uniform(-rotate_deg, rotate_deg)
        left, right = rng.uniform(0, crop, 2) * W
        top, bottom = rng.uniform(0, crop, 2) * H
        x, y = 60.0, 20.0
        cx, cy = (W - 1) / 2, (H - 1) / 2
        t = np.deg2rad(angle)  # cv2 angles are counter-clockwise with y pointing down
        rx = cx + np.cos(t) * (x - cx) + np.sin(t) * (y - cy)
        ry = cy - np.sin(t) * (x - cx) + np.cos(t) * (y - cy)
        ex, ey = (rx - left) * W / (W - left - right), (ry - top) * H / (H - top - bottom)
        m = augment.geometry_matrix(np.random.default_rng(seed), H, W, rotate_deg, crop)
        np.testing.assert_allclose(m @ [x, y, 1], [ex, ey], atol=1e-6)
        assert abs(angle) <= rotate_deg and max(left, right) <= crop * W

        image = np.zeros((H, W, 4), np.uint8)
        cv2.circle(image, (int(x), int(y)), 2, (255, 255, 255, 255), -1)
        out = augment.warp(image, m)
        ys, xs = np.nonzero(out[..., 3] > 100)
        assert abs(xs.mean() - ex) < 1.0 and abs(ys.mean() - ey) < 1.0


def test_edge_channel_untouched_by_colour_jitter():
    rgb = np.dstack([_blobs(2), _blobs(3), _blobs(4)])
    edge = _blobs(5)
    image = np.dstack([rgb, edge])
    jitter_only = augment.AugmentConfig(
        rotate_deg=0, crop_fraction=0, brightness=0.5, contrast=0.5, saturation=0.5
    )
    out = augment.augment(image, np.random.default_rng(0), jitter_only)
    np.testing.assert_array_equal(out[..., 3], edge)
    assert np.abs(out[..., :3].astype(int) - rgb).mean() > 1.0, "jitter did nothing to RGB"
    assert out.dtype == np.uint8

    # With geometry on too, the edge channel is exactly the warped input edge.
    full = augment.AugmentConfig(brightness=0.5, contrast=0.5, saturation=0.5)
    out = augment.augment(image, np.random.default_rng(7), full)
    m = augment.geometry_matrix(np.random.default_rng(7), H, W, full.rotate_deg, full.crop_fraction)
    np.testing.assert_array_equal(out[..., 3], augment.warp(image, m)[..., 3])


def test_colour_jitter_matches_sequential_definitions():
    """One colour matrix == brightness, then contrast around the mean grey, then saturation
    towards each pixel's grey (torchvision's definitions), clipped once."""
    image = np.random.default_rng(0).integers(0, 256, (H, W, 4), dtype=np.uint8)
    no_geometry = augment.AugmentConfig(
        rotate_deg=0, crop_fraction=0, brightness=0.3, contrast=0.3, saturation=0.3
    )
    for seed in range(4):
        rng = np.random.default_rng(seed)
        rng.uniform(size=5)  # the geometry draws come first
        b, c, s = (rng.uniform(0.7, 1.3) for _ in range(3))
        luma = np.array([0.299, 0.587, 0.114])
        x = image[..., :3].astype(np.float64) * b
        mean_grey = (x @ luma).mean()
        x = (x - mean_grey) * c + mean_grey
        grey = (x @ luma)[..., None]
        expected = np.clip((x - grey) * s + grey, 0, 255)
        out = augment.augment(image, np.random.default_rng(seed), no_geometry)
        np.testing.assert_allclose(out[..., :3], expected, atol=1.01)
        np.testing.assert_array_equal(out[..., 3], image[..., 3])


def test_config_from_mapping_rejects_typos():
    assert augment.AugmentConfig.of({"rotate_deg": 5}).rotate_deg == 5.0
    assert augment.AugmentConfig.of(None) == augment.AugmentConfig()
    with pytest.raises(ValueError, match="rotate_degs"):
        augment.AugmentConfig.of({"rotate_degs": 5})


def _scene(seed):
    """A smooth RGB picture with a binary edge channel (what records hold)."""
    rgb = np.stack([_blobs(seed + k) for k in range(3)], axis=-1)
    rgb = cv2.GaussianBlur(rgb, (7, 7), 0)
    edges = cv2.Canny(rgb[..., 0], 50, 100)
    return np.concatenate([rgb, edges[..., None]], axis=-1)


def test_device_warp_matches_cv2_warp_affine():
    """Same drawn matrix: the JAX warp is OpenCV's to within a grey level on average."""
    import jax.numpy as jnp

    from leopard_jax.data import device_augment

    config = augment.AugmentConfig(rotate_deg=15, crop_fraction=0.15)
    for seed in range(3):
        image = _scene(seed)
        matrix, _ = augment.draw(np.random.default_rng(seed), H, W, config)
        expected = augment.warp(image, matrix).astype(np.float32)
        got = np.asarray(device_augment.warp(jnp.asarray(image), jnp.asarray(matrix, jnp.float32)))
        assert got.shape == expected.shape
        interior = np.abs(got - expected)[2:-2, 2:-2]
        assert interior.mean() < 1.0, (seed, interior.mean())
        assert np.median(interior) == 0


def test_device_jitter_matches_cv2_transform_up_to_rounding():
    import jax.numpy as jnp

    from leopard_jax.data import device_augment

    config = augment.AugmentConfig(brightness=0.5, contrast=0.5, saturation=0.5)
    for seed in range(4):
        image = _scene(seed)
        _, factors = augment.draw(np.random.default_rng(seed), H, W, config)
        mean_rgb = np.array(cv2.mean(image)[:3], np.float32)
        expected = cv2.transform(image, augment.jitter_matrix(factors, mean_rgb))
        got = np.asarray(
            device_augment.jitter(
                jnp.asarray(image, jnp.float32), jnp.asarray(factors, jnp.float32)
            )
        )
        diff = np.abs(got - expected)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (seed, diff.max())
        np.testing.assert_array_equal(got[..., 3], image[..., 3])


def test_device_augment_of_the_drawn_parameters_is_the_host_augment():
    """augment() = warp with draw()'s matrix, then jitter with its factors: the device
    version of the same draw lands within a grey level; identity parameters (padding) keep
    the image exactly."""
    import jax.numpy as jnp

    from leopard_jax.data import device_augment

    config = augment.AugmentConfig()
    images = np.stack([_scene(s) for s in range(3)])
    draws = [augment.draw(np.random.default_rng(s), H, W, config) for s in range(3)]
    matrices = jnp.asarray(np.stack([m for m, _ in draws]), jnp.float32)
    factors = jnp.asarray(np.stack([f for _, f in draws]), jnp.float32)
    got = np.asarray(device_augment.augment_batch(jnp.asarray(images), matrices, factors))
    for s in range(3):
        host = augment.augment(images[s], np.random.default_rng(s), config).astype(np.float32)
        assert np.abs(got[s] - host)[2:-2, 2:-2].mean() < 1.0
    identity = device_augment.augment_batch(
        jnp.asarray(images), jnp.tile(jnp.eye(2, 3), (3, 1, 1)), jnp.ones((3, 3))
    )
    np.testing.assert_array_equal(np.asarray(identity), images.astype(np.float32))


def test_where_must_be_a_known_place():
    assert augment.AugmentConfig.of({"where": "device"}).where == "device"
    assert augment.AugmentConfig(where="auto").place("cpu") == "host"
    assert augment.AugmentConfig(where="auto").place("gpu") == "device"
    with pytest.raises(ValueError, match="where='gpu' is not one of"):
        augment.AugmentConfig.of({"where": "gpu"})
