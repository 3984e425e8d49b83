"""train.rows: which labelled rows train and which are held out, with the config's filters."""

import pytest

from configs import default
from leopard_jax.train import TrainingError, rows


def _row(identity, flank, split):
    return {
        "key": f"{identity}/{flank}{id(object())}",
        "identity": identity,
        "flank": flank,
        "split": split,
    }


def _dataset():
    table = []
    for identity, flanks, split in [
        ("A", ["left"] * 3 + ["front"], "train"),
        ("B", ["right"] * 2, "train"),
        ("C", ["left"] * 2 + ["up"] * 2, "test"),
    ]:
        table += [_row(identity, f, split) for f in flanks]
    return table + [_row("", "left", "")]  # unlabelled: never trains


def _config(**overrides):
    config = default.get_config()
    config.data_dir = "dataset"
    config.update(overrides)
    return config


def test_without_filters_every_labelled_row_of_its_split_is_used(tmp_path):
    train, test = rows.split_rows(_dataset(), _config(), tmp_path)
    assert sorted(r["identity"] for r in train) == ["A"] * 4 + ["B"] * 2
    assert sorted(r["flank"] for r in test) == ["left", "left", "up", "up"]


def test_flanks_filter_train_and_held_out_rows_alike(tmp_path):
    train, test = rows.split_rows(_dataset(), _config(flanks="left,RIGHT"), tmp_path)
    assert {r["flank"] for r in train} == {"left", "right"} and len(train) == 5
    assert [r["flank"] for r in test] == ["left", "left"]


def test_min_images_drops_small_training_individuals(tmp_path):
    train, _ = rows.split_rows(_dataset(), _config(min_images_per_identity=3), tmp_path)
    assert {r["identity"] for r in train} == {"A"}
    with pytest.raises(TrainingError, match="no training individual"):
        rows.split_rows(_dataset(), _config(min_images_per_identity=5), tmp_path)
