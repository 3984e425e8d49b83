"""Config files (ml_collections, as big_vision) and their validation.

Why validate by hand: ml_collections already refuses unknown keys and wrong types on the
command line (`--config.modle.dims=…` fails at parse time), but not bad values. A bad value
must stop the run with one line naming the key and the fix, before anything compiles.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import ml_collections

BACKBONES = ("efficientnetv2_b0", "efficientnetv2_b1", "efficientnetv2_b2", "efficientnetv2_b3", "resnet18")
HEADS = ("pooled", "spotid")
LOSSES = ("cosface", "arcface", "triplet")
MARGIN_FNS = ("adaptive", "constant")
DTYPES = ("float32", "bfloat16")
INIT_KINDS = ("random", "timm", "spotid")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def load_config(relative_to: str, name: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file `name` beside `relative_to` (for configs that
    derive from another one without making configs/ a package)."""
    path = pathlib.Path(relative_to).resolve().parent / name
    spec = importlib.util.spec_from_file_location(f"_leopard_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {message}")


def _one_of(config, key: str, allowed) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    _check(value in allowed, key, f"{value!r} is not one of {', '.join(map(repr, allowed))}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError on the first value that cannot work."""
    _check(bool(config.data_dir), "data_dir", "not set; pass --config.data_dir=DATASET_DIR (made by `python -m leopard_jax.preprocess`)")
    settings = pathlib.Path(config.data_dir) / "settings.json"
    _check(settings.is_file(), "data_dir", f"{settings} not found; is {config.data_dir} a dataset made by `python -m leopard_jax.preprocess`?")
    _one_of(config, "model.backbone", BACKBONES)
    _one_of(config, "model.head", HEADS)
    _one_of(config, "model.dtype", DTYPES)
    _one_of(config, "loss.name", LOSSES)
    _one_of(config, "loss.margin_fn", MARGIN_FNS)
    _one_of(config, "init.kind", INIT_KINDS)
    _check(config.model.dims > 0, "model.dims", "must be positive")
    _check(0.0 <= config.model.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
    _check(config.num_epochs > 0, "num_epochs", "must be positive")
    _check(config.batch_size > 0, "batch_size", "must be positive")
    _check(config.images_per_identity >= 2, "images_per_identity", "needs at least 2 (positive pairs)")
    _check(config.batch_size % config.images_per_identity == 0, "batch_size",
                  f"{config.batch_size} is not a multiple of images_per_identity={config.images_per_identity}")
    _check(config.optim.learning_rate > 0, "optim.learning_rate", "must be positive")
    _check(config.optim.decay_every_epochs > 0, "optim.decay_every_epochs", "must be positive")
    _check(0.0 < config.optim.decay_factor <= 1.0, "optim.decay_factor", "must be in (0, 1]")
    _check(config.loss.scale > 0, "loss.scale", "must be positive")
    _check(config.loss.margin >= 0, "loss.margin", "must be ≥ 0")
    _check(0.0 < config.split.test_fraction < 1.0, "split.test_fraction", "must be in (0, 1)")
    _check(config.eval.batch_size > 0, "eval.batch_size", "must be positive")
    _check(config.max_bad_steps > 0, "max_bad_steps", "must be positive")
    _check(config.workers >= 0, "workers", "must be ≥ 0")
    if config.init.kind != "random":
        _check(os.path.isfile(config.init.path), "init.path",
                      f"{config.init.path or '(empty)'} is not a file; give the local {config.init.kind} weights file")
