"""Train/test split by individual."""

import json
import subprocess
import sys

import numpy as np
import pytest

from leopard_jax.data import records, split

IDS = [f"L{k:02d}_{flank}" for k in range(20) for flank in ("left", "right")] + [
    f"S{k}" for k in range(10)
]


def test_no_individual_on_both_sides_and_fraction_respected():
    result = split.split_identities(IDS, test_fraction=0.2, seed=0)
    train, test = set(result["train"]), set(result["test"])
    assert train | test == set(IDS) and not train & test

    def animals(ids):
        return {split.individual(i) for i in ids}

    assert not animals(train) & animals(test), "both flanks of an animal must stay together"
    assert len(animals(test)) == round(0.2 * 30)


def test_seed_decides_the_draw_and_repeats():
    a = split.split_identities(IDS, test_fraction=0.3, seed=1)
    assert a == split.split_identities(IDS, test_fraction=0.3, seed=1)
    assert a["test"] != split.split_identities(IDS, test_fraction=0.3, seed=2)["test"]


def test_each_individual_is_held_out_about_as_often():
    counts = {}
    for seed in range(400):
        for animal in {
            split.individual(i)
            for i in split.split_identities(IDS, test_fraction=0.2, seed=seed)["test"]
        }:
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
    items = [
        ({"key": f"{i}/{n}", "identity": i}, np.zeros((2, 2, 4), np.uint8))
        for i in identities
        for n in range(2)
    ]
    records.write_records(path, "s0", items)


def test_cli_writes_split_json_read_by_records(tmp_path):
    _dataset(tmp_path, IDS[:10])
    cmd = [
        sys.executable,
        "-m",
        "leopard_jax.data.split",
        "--data",
        str(tmp_path),
        "--test-fraction",
        "0.4",
        "--seed",
        "0",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    by_split = json.loads((tmp_path / "split.json").read_text())
    assert by_split == split.split_identities(IDS[:10], test_fraction=0.4, seed=0)
    rows = records.read_manifest(tmp_path)
    assert {r["split"] for r in rows} == {"train", "test"}

    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    missing = subprocess.run(
        [*cmd[:4], str(tmp_path / "nope"), *cmd[5:]], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "settings.json" in missing.stderr


def test_closed_set_keeps_every_identity_on_both_sides():
    rows = [{"key": f"{i}/{n}", "identity": i} for i in ("a", "b", "c") for n in range(5)]
    rows += [{"key": "d/0", "identity": "d"}, {"key": "x/0", "identity": ""}]
    result = split.split_records(rows, test_fraction=0.4, seed=0)
    assert result == split.split_records(rows, test_fraction=0.4, seed=0)
    train, test = set(result["train"]), set(result["test"])
    assert not train & test and train | test == {r["key"] for r in rows} - {"x/0"}
    for i in ("a", "b", "c"):
        assert len([k for k in test if k.startswith(f"{i}/")]) == 2  # round(0.4 × 5)
    assert "d/0" in train  # one record: nothing to hold out
    with pytest.raises(ValueError, match="no labelled records"):
        split.split_records(rows[-1:], test_fraction=0.4, seed=0)


def test_filter_rows_by_flank_then_images_per_identity():
    rows = [
        {"identity": "a", "flank": "left"},
        {"identity": "a", "flank": "left"},
        {"identity": "a", "flank": "front"},
        {"identity": "b", "flank": "right"},
        {"identity": "b", "flank": "Right"},
        {"identity": "c", "flank": "left"},
        {"identity": "", "flank": "left"},
        {"identity": "d", "flank": ""},
    ]
    assert split.filter_rows(rows) == rows
    sides = split.filter_rows(rows, flanks=("left", "right"))
    assert [r["identity"] for r in sides] == ["a", "a", "b", "b", "c", ""]
    assert split.filter_rows(rows, flanks="LEFT, right") == sides
    assert [r["identity"] for r in split.filter_rows(rows, min_images=3)] == ["a", "a", "a", ""]
    # The count is taken after the flank filter: "a" has two left/right images, not three.
    both = split.filter_rows(rows, flanks=("left", "right"), min_images=2)
    assert [r["identity"] for r in both] == ["a", "a", "b", "b", ""]


def test_manifest_split_comes_from_split_json_else_the_input(tmp_path):
    records.save_settings(tmp_path, {"height": 2, "width": 2, "channels": 4})
    image = np.zeros((2, 2, 4), np.uint8)
    own = [
        ({"key": f"{i}/{n}", "identity": i, "split": s}, image)
        for i, s in (("a", "train"), ("b", "test"))
        for n in range(2)
    ]
    records.write_records(tmp_path, "s0", own)
    assert [r["split"] for r in records.read_manifest(tmp_path)] == ["train"] * 2 + ["test"] * 2
    assert split.main(["--data", str(tmp_path)]) == 2  # the input's own split stays...
    records.save_split(tmp_path, {"train": ["a/0", "b/0"], "test": ["a/1"]}, by_record=True)
    assert records.split_of_keys(tmp_path) == {
        "a/0": "train",
        "a/1": "test",
        "b/0": "train",
        "b/1": "",
    }
    assert records.load_split(tmp_path) == {}
    records.save_split(tmp_path, {"train": ["b"], "test": ["a"]})
    assert [r["split"] for r in records.read_manifest(tmp_path)] == ["test"] * 2 + ["train"] * 2
    assert split.main(["--data", str(tmp_path), "--overwrite", "--closed-set", "--seed", "1"]) == 0
    by_record = json.loads((tmp_path / "split.json").read_text())["records"]
    assert sorted(by_record["train"] + by_record["test"]) == ["a/0", "a/1", "b/0", "b/1"]
    assert split.main(["--data", str(tmp_path), "--test-fraction", "1.5", "--overwrite"]) == 2


def test_rows_written_before_the_new_columns_read_as_empty(tmp_path):
    _dataset(tmp_path, ["a"])
    shard = tmp_path / "shards" / "s0.csv"
    old = records.MANIFEST_FIELDS[: records.MANIFEST_FIELDS.index("edge") + 1]
    lines = shard.read_text().splitlines()
    cut = [",".join(line.split(",")[: len(old)]) for line in lines]
    shard.write_text("\n".join(cut) + "\n")
    rows = records.read_manifest(tmp_path)
    assert [(r["key"], r["annotation"], r["date"], r["viewpoint"], r["split"]) for r in rows] == [
        ("a/0", "", "", "", ""),
        ("a/1", "", "", "", ""),
    ]


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        split.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--test-fraction", "--seed", "--overwrite", "--closed-set"):
        assert flag in text
