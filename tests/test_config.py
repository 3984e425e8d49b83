"""Configs as modules, and validation that reads the registries (no copies of their names)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from configs import arcface, cosface, default, demo, triplet
from leopard_jax import config as config_lib
from leopard_jax import losses
from leopard_jax.data import records

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def config(tmp_path):
    """The default config on an (empty) dataset folder that has its settings.json."""
    records.save_settings(tmp_path, dict(height=32, width=64, channels=4))
    c = default.get_config()
    c.data_dir = str(tmp_path)
    return c


def test_derived_configs_import_their_base_and_change_only_their_own_keys():
    base = default.get_config().to_dict()
    assert cosface.get_config().loss.margin_fn == "constant"
    assert (arcface.get_config().loss.name, arcface.get_config().loss.margin) == ("arcface", 0.5)
    assert triplet.get_config().loss.name == "triplet"
    derived = arcface.get_config().to_dict()
    assert {k: v for k, v in derived.items() if k != "loss"} == {
        k: v for k, v in base.items() if k != "loss"
    }
    assert demo.get_config().data_dir.endswith("demo_out/dataset")


def test_a_config_file_loaded_by_path_equals_the_module():
    """`--config configs/demo.py` loads the file by path, as config_flags does."""
    spec = importlib.util.spec_from_file_location("demo_by_path", CONFIGS / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.get_config().to_dict() == demo.get_config().to_dict()


@pytest.mark.parametrize("module", [default, demo, cosface, arcface, triplet])
def test_shipped_configs_are_valid(module, config):
    c = module.get_config()
    c.data_dir = config.data_dir
    config_lib.validate(c)


def test_every_margin_function_is_accepted_and_a_typo_lists_them(config):
    for name in losses.MARGIN_FUNCTIONS:
        config.loss.margin_fn = name
        config_lib.validate(config)
    config.loss.margin_fn = "adaptiv"
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config)
    message = str(e.value)
    assert "\n" not in message and message.startswith("config.loss.margin_fn: 'adaptiv'")
    assert all(repr(name) in message for name in losses.MARGIN_FUNCTIONS)


def test_a_new_registry_entry_needs_no_change_in_validation(config, monkeypatch):
    config.loss.margin_fn = "my_margin"
    with pytest.raises(config_lib.ConfigError, match="my_margin"):
        config_lib.validate(config)
    margins = {**losses.MARGIN_FUNCTIONS, "my_margin": losses.constant_margin}
    monkeypatch.setattr(losses, "MARGIN_FUNCTIONS", margins)
    config_lib.validate(config)
    config.loss.name = "my_loss"
    monkeypatch.setattr(losses, "LOSSES", {**losses.LOSSES, "my_loss": losses.LOSSES["cosface"]})
    config_lib.validate(config)


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.backbone", "efficientnetv2_b9"),
        ("model.head", "pooledd"),
        ("model.dtype", "float16"),
        ("loss.name", "cosfase"),
        ("init.kind", "imagenet"),
        ("augment.where", "gpu"),
    ],
)
def test_unknown_names_are_rejected_with_the_valid_ones(config, key, value):
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config)
    message = str(e.value)
    assert message.startswith(f"config.{key}: {value!r} is not one of")
    assert all(repr(n) in message for n in config_lib.choices()[key])


def test_augment_settings_come_from_the_augment_config(config):
    assert set(config.augment.keys()) == set(config_lib.augment_settings())
    config.unlock()
    config.augment.blur = 0.5
    with pytest.raises(
        config_lib.ConfigError, match=r"config\.augment: unknown settings \['blur'\]"
    ):
        config_lib.validate(config)
    del config.augment["blur"]
    config.augment.rotate_deg = -1.0
    with pytest.raises(config_lib.ConfigError, match=r"config\.augment\.rotate_deg"):
        config_lib.validate(config)


def test_missing_dataset_is_named_first(config):
    config.data_dir = ""
    config.loss.margin_fn = "adaptiv"
    with pytest.raises(config_lib.ConfigError, match="config.data_dir: not set"):
        config_lib.validate(config)
