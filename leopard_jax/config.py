"""Validation of training configs (ml_collections, as big_vision; the files are `configs/`).

Why validate by hand: ml_collections already refuses unknown keys and wrong types on the
command line (`--config.modle.dims=…` fails at parse time), but not bad values. A bad value
must stop the run with one line naming the key and the fix, before anything compiles.

The allowed names are read from the registries that implement them, never copied here, so
a new backbone, head, loss, margin function, dtype or init is one entry where it is defined.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable

import ml_collections


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def choices() -> dict[str, tuple[str, ...]]:
    """Config key -> the names its registry holds."""
    from leopard_jax import losses
    from leopard_jax.data.augment import PLACES
    from leopard_jax.models import BACKBONES, DTYPES
    from leopard_jax.models.embedding import HEADS
    from leopard_jax.train.state import INITS

    return {
        "model.backbone": tuple(BACKBONES),
        "model.head": tuple(HEADS),
        "model.dtype": tuple(DTYPES),
        "loss.name": tuple(losses.LOSSES),
        "loss.margin_fn": tuple(losses.MARGIN_FUNCTIONS),
        "init.kind": tuple(INITS),
        "augment.where": PLACES,
    }


def augment_settings() -> tuple[str, ...]:
    """The keys config.augment may have: the fields of the augmentation's own config."""
    from leopard_jax.data.augment import AugmentConfig

    return tuple(f.name for f in dataclasses.fields(AugmentConfig))


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {message}")


def _get(config: ml_collections.ConfigDict, key: str):
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def _one_of(config: ml_collections.ConfigDict, key: str, allowed: Iterable[str]) -> None:
    value = _get(config, key)
    _check(value in allowed, key, f"{value!r} is not one of {', '.join(map(repr, allowed))}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError on the first value that cannot work."""
    _check(
        bool(config.data_dir),
        "data_dir",
        "not set; pass --config.data_dir=DATASET_DIR (made by `python -m leopard_jax.preprocess`)",
    )
    settings = pathlib.Path(config.data_dir) / "settings.json"
    _check(
        settings.is_file(),
        "data_dir",
        f"{settings} not found; is {config.data_dir} a dataset made by "
        "`python -m leopard_jax.preprocess`?",
    )
    augment = set(config.augment.keys())
    unknown = sorted(augment - set(augment_settings()))
    _check(not unknown, "augment", f"unknown settings {unknown}; allowed: {augment_settings()}")
    for key, allowed in choices().items():
        if key != "augment.where" or "where" in augment:
            _one_of(config, key, allowed)
    for key in sorted(augment - {"where"}):
        _check(config.augment[key] >= 0, f"augment.{key}", "must be ≥ 0 (0 switches it off)")
    _check(config.model.dims > 0, "model.dims", "must be positive")
    _check(0.0 <= config.model.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
    _check(config.num_epochs > 0, "num_epochs", "must be positive")
    _check(config.batch_size > 0, "batch_size", "must be positive")
    _check(
        config.images_per_identity >= 2, "images_per_identity", "needs at least 2 (positive pairs)"
    )
    _check(
        config.batch_size % config.images_per_identity == 0,
        "batch_size",
        f"{config.batch_size} is not a multiple of "
        f"images_per_identity={config.images_per_identity}",
    )
    _check(config.optim.learning_rate > 0, "optim.learning_rate", "must be positive")
    _check(config.optim.decay_every_epochs > 0, "optim.decay_every_epochs", "must be positive")
    _check(0.0 < config.optim.decay_factor <= 1.0, "optim.decay_factor", "must be in (0, 1]")
    _check(config.loss.scale > 0, "loss.scale", "must be positive")
    _check(config.loss.margin >= 0, "loss.margin", "must be ≥ 0")
    _check(0.0 < config.split.test_fraction < 1.0, "split.test_fraction", "must be in (0, 1)")
    _check(config.eval.batch_size > 0, "eval.batch_size", "must be positive")
    _check(config.eval.cache_mb >= 0, "eval.cache_mb", "must be ≥ 0 (0: read every time)")
    _check(config.max_bad_steps > 0, "max_bad_steps", "must be positive")
    _check(config.workers >= 0, "workers", "must be ≥ 0")
    _check(
        config.min_images_per_identity >= 0,
        "min_images_per_identity",
        "must be ≥ 0 (0: no minimum)",
    )
    if config.init.kind != "random":
        _check(
            os.path.isfile(config.init.path),
            "init.path",
            f"{config.init.path or '(empty)'} is not a file; "
            f"give the local {config.init.kind} weights file",
        )
