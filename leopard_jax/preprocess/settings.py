"""Preprocessing settings: validated, made explicit, and kept equal across every run (and
every `--shard` part) that writes into one dataset dir (outdir.agree_settings)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
from typing import Any

from leopard_jax.data import records
from leopard_jax.preprocess import background, render


class PreprocessError(RuntimeError):
    """A setup problem (settings, models, output dir); the message is one actionable line."""


# Settings that may change between runs into one dataset without changing any record.
_RUN_ONLY = ("input", "output", "images", "workers", "onnx_threads", "shard_size", "shard")
# Settings newer than some datasets: an old settings.json without them meant these values.
_ADDED = {"boxes": "annotations", "identity_field": "name", "split_field": "split"}
_BOXES = ("annotations", "detector")
_SHARD = re.compile(r"^(\d+)/(\d+)$")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard I/N` -> (I, N); "" -> (0, 1), the whole input."""
    if not text:
        return 0, 1
    match = _SHARD.match(text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise PreprocessError(
            f"--shard {text}: use I/N with 0 <= I < N, e.g. --shard 0/4 ... --shard 3/4"
        )
    return int(match[1]), int(match[2])


def resolve_settings(config) -> dict[str, Any]:
    """Validated plain-dict settings with every 'auto' made explicit (what settings.json holds).

    An empty detector is left empty: whether one is needed depends on the input
    (`require_detector`)."""
    s = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    s = {k: (dict(v) if isinstance(v, dict) else v) for k, v in s.items()}
    s = {**_ADDED, "images": "", "shard": "", **s}
    if not s.get("input"):
        raise PreprocessError(
            "--input is required: a folder of photos, a CSV path,identity[,flank] or a COCO .json"
        )
    if not s.get("output"):
        raise PreprocessError(
            "--output is required: the dataset folder to write (created if missing)"
        )
    parse_shard(s["shard"])
    if s["boxes"] not in _BOXES:
        raise PreprocessError(f"boxes={s['boxes']!r}: use one of {_BOXES}")
    det, bg = s["detector"], s["background"]
    det["model"] = str(det["model"] or "")
    if det["model"] and det["model"].lower() != "none":
        if not os.path.isfile(det["model"]):
            raise PreprocessError(
                f"--detector {det['model']}: no such file; give an ONNX file or 'none'"
            )
        det["sha256"] = _sha256(det["model"])
    bg["model"] = str(bg["model"] or "none")
    use_bg = bg["model"].lower() != "none"
    if use_bg and background.is_model_file(bg["model"]):
        if not os.path.isfile(bg["model"]):
            raise PreprocessError(
                f"--background {bg['model']}: no such file; give a .onnx file or a rembg model name"
            )
        bg["sha256"] = _sha256(bg["model"])
    if s["edges"]["source"] == "auto":
        s["edges"]["source"] = "removed" if use_bg else "crop"
    for name, value in (("rgb_source", s["rgb_source"]), ("edges.source", s["edges"]["source"])):
        if value not in ("crop", "removed"):
            raise PreprocessError(f"{name}={value!r}: use crop or removed")
        if value == "removed" and not use_bg:
            raise PreprocessError(
                f"{name}=removed needs a background model: --background u2netp (or a .onnx file)"
            )
    if s["render"]["mode"] not in render.MODES:
        raise PreprocessError(f"render.mode={s['render']['mode']!r}: use one of {render.MODES}")
    k = s["edges"]["blur_ksize"]
    if k < 0 or (k and k % 2 == 0):
        raise PreprocessError(f"edges.blur_ksize={k}: use an odd size (e.g. 5) or 0 for no blur")
    if s["shard_size"] < 1:
        raise PreprocessError(f"shard_size={s['shard_size']}: use at least 1")
    cores = os.cpu_count() or 1
    if s["workers"] == 0:
        s["workers"] = cores
    if s["onnx_threads"] == 0:
        s["onnx_threads"] = max(1, cores // max(1, s["workers"]))
    return s


def require_detector(s: dict[str, Any], all_boxed: bool) -> None:
    """A detector must be named unless every item comes with its annotated box (and
    `boxes` keeps those); 'none' crops whole photos. Sets an unneeded one to 'none'."""
    model = s["detector"]["model"]
    if s["boxes"] == "detector" and model.lower() in ("", "none"):
        raise PreprocessError("boxes=detector needs a detector: --detector MODEL.onnx")
    if not model and not all_boxed:
        raise PreprocessError(
            "--detector is required: an ONNX detector (e.g. MegaDetector v5 exported to ONNX) "
            "or 'none' for photos that are already crops"
        )
    s["detector"]["model"] = model or "none"


def dataset_settings(s: dict[str, Any]) -> dict[str, Any]:
    """What settings.json stores: the record shape and every setting that shaped a record."""
    kept = {k: v for k, v in s.items() if k not in _RUN_ONLY}
    return {"height": s["render"]["height"], "width": s["render"]["width"], "channels": 4, **kept}


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings without model paths (a moved model with the same sha256 is the same model)."""
    out = {
        k: v for k, v in {**_ADDED, **settings}.items() if k not in ("format_version", *_RUN_ONLY)
    }
    for section in ("detector", "background"):
        if isinstance(out.get(section), dict) and "sha256" in out[section]:
            out[section] = {k: v for k, v in out[section].items() if k != "model"}
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_same_settings(output: pathlib.Path, settings: dict[str, Any]) -> None:
    """A resumed run (or another part) must render records exactly as the first run did."""
    path = output / records.SETTINGS_FILE
    if not path.is_file():
        return
    old, new = _flat(_comparable(records.load_settings(output))), _flat(_comparable(settings))
    if old == new:
        return
    diff = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]
    raise PreprocessError(
        f"{output} was made with other settings ({'; '.join(diff[:4])}); use a new --output folder "
        "or the settings in its settings.json"
    )
