"""Background removal with a rembg session (U²-Net family, run by ONNX Runtime).

rembg 2.0.86 loads a custom model file only from inside its model home (U2NET_HOME /
REMBG_HOME). For a local `.onnx` we point U2NET_HOME at the file's own folder while the
session is built and restore the environment right after: no copy, nothing left behind.
"""

from __future__ import annotations

import contextlib
import os
import pathlib

import numpy as np


@contextlib.contextmanager
def _model_home(folder: pathlib.Path):
    """U2NET_HOME = folder for the duration (rembg reads it when the session is built)."""
    old = os.environ.get("U2NET_HOME")
    os.environ["U2NET_HOME"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("U2NET_HOME", None)
        else:
            os.environ["U2NET_HOME"] = old


def is_model_file(model: str) -> bool:
    return model.lower().endswith(".onnx") or os.sep in model or "/" in model


def new_session(model: str, custom_session: str = "u2net_custom", threads: int = 0):
    """A rembg session from a model name ("u2netp"; rembg downloads it once into its home)
    or a local .onnx file (run with rembg's `custom_session` class, default u2net_custom)."""
    import rembg

    from leopard_jax.preprocess.detect import providers as available_providers
    from leopard_jax.preprocess.detect import session_options

    options, providers = session_options(threads), available_providers()
    if not is_model_file(model):
        try:
            return rembg.new_session(model, sess_opts=options, providers=providers)
        except ValueError as e:
            raise ValueError(
                f"background model {model!r}: {e}; or give a local .onnx file"
            ) from None
        except Exception as e:  # download failures surface as many types (network, checksum)
            raise RuntimeError(
                f"background model {model!r} could not be loaded ({type(e).__name__}: {e}); "
                "without network access give a local .onnx file, e.g. --background "
                "/path/u2netp.onnx"
            ) from None
    path = pathlib.Path(model).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(
            f"background model {path}: no such file; give a .onnx file or a rembg model name"
        )
    try:
        with _model_home(path.parent):
            return rembg.new_session(
                custom_session, sess_opts=options, providers=providers, model_path=str(path)
            )
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail...)
        raise ValueError(
            f"background model {path}: not loadable by rembg {custom_session!r} ({e})"
        ) from None


def predict_mask(session, rgb: np.ndarray) -> np.ndarray:
    """Foreground probability as uint8 H×W (255 = animal), the size of `rgb`."""
    from PIL import Image

    (mask,) = session.predict(Image.fromarray(rgb))[:1]
    return np.asarray(mask.convert("L"), dtype=np.uint8)


def apply_mask(rgb: np.ndarray, mask: np.ndarray, fill: int = 0) -> np.ndarray:
    """Blend towards `fill` where the mask says background (soft alpha, as rembg's cutout)."""
    alpha = mask.astype(np.float32)[..., None] / 255.0
    out = rgb.astype(np.float32) * alpha + float(fill) * (1.0 - alpha)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


class BackgroundRemover:
    """Callable: RGB uint8 -> (background-removed RGB, mask)."""

    def __init__(
        self, model: str, *, custom_session: str = "u2net_custom", fill: int = 0, threads: int = 0
    ):
        self.session = new_session(model, custom_session, threads)
        self.fill = fill

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = predict_mask(self.session, rgb)
        return apply_mask(rgb, mask, self.fill), mask
