"""The training augmentation as pure JAX functions, for `augment.where="device"`.

The loader ships uint8 records with each image's parameters, drawn on the host by
`augment.draw` (so the stream does not depend on where they are applied), and the jitted
step applies them here: the same affine warp as `cv2.warpAffine` (bilinear, zeros outside,
source coordinates rounded to 1/32 pixel as OpenCV does) and the same colour matrix as
`augment.jitter_matrix`, each rounded and clipped to 0..255 as OpenCV's uint8 output is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from leopard_jax.data import augment

_SUBPIXEL = 32  # OpenCV's INTER_TAB_SIZE: source coordinates are rounded to 1/32 pixel


def _inverse(matrix: jax.Array) -> jax.Array:
    """Inverse of a 2×3 affine (output pixel -> source pixel, as warpAffine samples)."""
    (a, b, c), (d, e, f) = matrix[0], matrix[1]
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    return jnp.array([[ia, ib, -(ia * c + ib * f)], [id_, ie, -(id_ * c + ie * f)]])


def warp(image: jax.Array, matrix: jax.Array) -> jax.Array:
    """uint8 [H, W, C] and a 2×3 source->output affine -> float32 [H, W, C] of whole grey
    levels: `augment.warp` on the device."""
    height, width, channels = image.shape
    inverse = _inverse(matrix.astype(jnp.float32))
    ys, xs = jnp.mgrid[0:height, 0:width].astype(jnp.float32)
    u = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    v = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    u = jnp.floor(u * _SUBPIXEL + 0.5) / _SUBPIXEL
    v = jnp.floor(v * _SUBPIXEL + 0.5) / _SUBPIXEL
    x0, y0 = jnp.floor(u), jnp.floor(v)
    fx, fy = (u - x0)[..., None], (v - y0)[..., None]
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    flat = image.reshape(height * width, channels).astype(jnp.float32)

    def tap(x, y):
        inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
        index = jnp.clip(y, 0, height - 1) * width + jnp.clip(x, 0, width - 1)
        return jnp.where(inside[..., None], flat[index], 0.0)

    out = (1 - fy) * ((1 - fx) * tap(x0, y0) + fx * tap(x0 + 1, y0)) + fy * (
        (1 - fx) * tap(x0, y0 + 1) + fx * tap(x0 + 1, y0 + 1)
    )
    return jnp.clip(jnp.round(out), 0, 255)


def jitter(image: jax.Array, factors: jax.Array) -> jax.Array:
    """float32 [H, W, 4] grey levels and (brightness, contrast, saturation) -> the jittered
    image, RGB only: `augment.jitter_matrix` applied as cv2.transform applies it."""
    luma = jnp.asarray(augment.LUMA)
    b, c, s = factors[0], factors[1], factors[2]
    grey_mean = b * (luma @ image[..., :3].mean(axis=(0, 1)))
    to_grey = jnp.outer(jnp.ones(3), luma)
    rgb = c * b * (s * jnp.eye(3) + (1 - s) * to_grey)
    out = image[..., :3] @ rgb.T + (1 - c) * grey_mean
    return jnp.concatenate([jnp.clip(jnp.round(out), 0, 255), image[..., 3:]], axis=-1)


def augment_batch(images: jax.Array, matrices: jax.Array, factors: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 4], [B, 2, 3], [B, 3] -> float32 [B, H, W, 4] in 0..255: warp, then
    colour jitter (factors of 1 leave colours as they are)."""
    return jax.vmap(lambda x, m, f: jitter(warp(x, m), f))(images, matrices, factors)
