"""Train/test split by individual."""

import json
import subprocess
import sys

import numpy as np
import pytest

from leopard_jax.data import records, split

IDS = [f"L{k:02d}_{flank}" for k in range(20) for flank in ("left", "right")] + [f"S{k}" for k in range(10)]


def test_no_individual_on_both_sides_and_fraction_respected():
    result = split.split_identities(IDS, test_fraction=0.2, seed=0)
    train, test = set(result["train"]), set(result["test"])
    assert train | test == set(IDS) and not train & test
    animals = lambda ids: {split.individual(i) for i in ids}
    assert not animals(train) & animals(test), "both flanks of an animal must stay together"
    assert len(animals(test)) == round(0.2 * 30)


def test_seed_decides_the_draw_and_repeats():
    a = split.split_identities(IDS, test_fraction=0.3, seed=1)
    assert a == split.split_identities(IDS, test_fraction=0.3, seed=1)
    assert a["test"] != split.split_identities(IDS, test_fraction=0.3, seed=2)["test"]


def test_each_individual_is_held_out_about_as_often():
    counts = {}
    for seed in range(400):
        for animal in {split.individual(i) for i in split.split_identities(IDS, test_fraction=0.2, seed=seed)["test"]}:
            counts[animal] = counts.get(animal, 0) + 1
    assert len(counts) == 30
    np.testing.assert_allclose(np.array(list(counts.values())) / 400, 0.2, atol=0.08)


def test_individual_strips_only_a_flank_suffix():
    assert split.individual("BGL09_right") == split.individual("BGL09_Right") == "BGL09"
    assert split.individual("CUL66_Left") == "CUL66"
    assert split.individual("Bright") == "Bright"
    with pytest.raises(ValueError, match="test_fraction"):
        split.split_identities(IDS, test_fraction=1.0, seed=0)


def _dataset(path, identities):
    records.save_settings(path, {"height": 2, "width": 2, "channels": 4})
    items = [({"key": f"{i}/{n}", "identity": i}, np.zeros((2, 2, 4), np.uint8)) for i in identities for n in range(2)]
    records.write_records(path, "s0", items)


def test_cli_writes_split_json_read_by_records(tmp_path):
    _dataset(tmp_path, IDS[:10])
    cmd = [sys.executable, "-m", "leopard_jax.data.split", "--data", str(tmp_path), "--test-fraction", "0.4", "--seed", "0"]
    subprocess.run(cmd, check=True, capture_output=True)
    by_split = json.loads((tmp_path / "split.json").read_text())
    assert by_split == split.split_identities(IDS[:10], test_fraction=0.4, seed=0)
    rows = records.read_manifest(tmp_path)
    assert {r["split"] for r in rows} == {"train", "test"}

    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    missing = subprocess.run([*cmd[:4], str(tmp_path / "nope"), *cmd[5:]], capture_output=True, text=True)
    assert missing.returncode == 2 and "settings.json" in missing.stderr
