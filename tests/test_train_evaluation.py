"""The held-out set of the training loop's evaluation: sent to the devices once when it fits
in config.eval.cache_mb, read from disk otherwise, and embedded alike either way."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import default
from leopard_jax import config as config_lib
from leopard_jax import inference
from leopard_jax.data import records
from leopard_jax.train import evaluation

H, W, C = 8, 16, 4
N = 5


@pytest.fixture
def held_out(tmp_path):
    records.save_settings(tmp_path, dict(height=H, width=W, channels=C))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, H, W, C), dtype=np.uint8)
    rows = ({"key": f"k{i}", "source": f"{i}.jpg", "identity": f"id{i // 2}"} for i in range(N))
    records.write_records(tmp_path, "part-00000", zip(rows, images, strict=True))
    return records.RecordSource(tmp_path), images


def config_with(cache_mb: float, batch_size: int = 2):
    config = default.get_config()
    config.eval.cache_mb = cache_mb
    config.eval.batch_size = batch_size
    return config


def test_a_set_that_fits_is_sent_once_as_the_batches_the_host_path_sends(held_out):
    source, images = held_out
    exact_mb = N * H * W * C / jax.local_device_count() / 2**20
    on_devices = evaluation.held_out_images(source, config_with(exact_mb))
    assert isinstance(on_devices, inference.DeviceBatches)
    assert on_devices.count == N and len(on_devices.batches) == 3  # 2 + 2 + 1 padded
    sent = np.concatenate([np.asarray(b).reshape(-1, H, W, C) for b in on_devices.batches])
    np.testing.assert_array_equal(sent[:N], images)
    np.testing.assert_array_equal(sent[N:], 0)


def test_a_set_over_the_budget_or_a_zero_budget_is_read_every_time(held_out):
    source, _ = held_out
    just_over = N * H * W * C / jax.local_device_count() / 2**20 * 0.99
    assert evaluation.held_out_images(source, config_with(just_over)) is source
    assert evaluation.held_out_images(source, config_with(0)) is source


def test_a_negative_budget_is_a_config_error(tmp_path):
    records.save_settings(tmp_path, dict(height=H, width=W, channels=C))
    config = config_with(-1)
    config.data_dir = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match=r"config\.eval\.cache_mb"):
        config_lib.validate(config)
