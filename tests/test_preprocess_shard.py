"""`--shard I/N`: parts of one input run at once into one dataset dir, as a job array would."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from test_preprocess_coco import leopard_coco, settings

from leopard_jax.data import records
from leopard_jax.preprocess import outdir, pipeline
from leopard_jax.preprocess.settings import PreprocessError, parse_shard

REPO = pathlib.Path(__file__).resolve().parents[1]


def cli(*args):
    return [sys.executable, "-m", "leopard_jax.preprocess", *args]


def content(output):
    """Every record (row without its shard placement, and pixels) and rejection, by key."""
    source = records.RecordSource(output)
    rows = {
        row["key"]: ({k: v for k, v in row.items() if k not in ("shard", "index")}, source[i])
        for i, row in enumerate(source.rows)
    }
    rejected = sorted(tuple(r.values()) for r in records.read_rejected(output))
    return rows, rejected


def test_two_parts_at_once_give_the_records_of_one_run(tmp_path):
    annotations = leopard_coco(tmp_path)
    out = tmp_path / "parts"
    args = [
        "--input",
        str(annotations),
        "--output",
        str(out),
        "--workers=-1",
        "--config.shard_size=1",
        "--config.render.height=32",
        "--config.render.width=64",
    ]
    procs = [
        subprocess.Popen(cli(*args, f"--shard={i}/2"), cwd=REPO, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "complete once every part has run" in err, err
    whole = tmp_path / "whole"
    pipeline.run(settings(annotations, whole), log=lambda m: None)

    got, want = content(out), content(whole)
    assert got[0].keys() == want[0].keys() and len(want[0]) == 6
    for key, (row, record) in want[0].items():
        assert got[0][key][0] == row
        np.testing.assert_array_equal(got[0][key][1], record)
    assert got[1] == want[1] and len(want[1]) == 1
    assert sorted(p.name for p in out.glob("rejected*.csv")) == [
        "rejected-part0of2.csv",
        "rejected-part1of2.csv",
    ]
    assert all("-part" in name for name in records.shard_names(out))
    assert records.load_settings(out) == records.load_settings(whole)

    # Each part resumes on its own: nothing left to do in part 1.
    again = subprocess.run(cli(*args, "--shard=1/2"), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and "done: 0 items" in again.stderr
    assert "3 skipped" in again.stderr  # annotations 12, 14, 16


def test_a_part_refuses_other_settings_and_bad_shards(tmp_path):
    annotations = leopard_coco(tmp_path)
    out = tmp_path / "ds"
    pipeline.run(settings(annotations, out, shard="0/2"), log=lambda m: None)
    with pytest.raises(PreprocessError, match="canny_low: 55 -> 40"):
        pipeline.run(settings(annotations, out, shard="1/2", **{"edges.canny_low": 40}), log=print)
    assert parse_shard("") == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ("2/2", "1", "-1/2", "a/b"):
        with pytest.raises(PreprocessError, match=f"--shard {bad}: use I/N"):
            parse_shard(bad)
    done = subprocess.run(
        cli("--input", str(annotations), "--output", str(out), "--shard=4/2"),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: --shard 4/2: use I/N with 0 <= I < N, e.g. --shard 0/4 ... --shard 3/4"
    )


def test_parts_exclude_a_whole_run_and_themselves_but_not_each_other(tmp_path):
    with outdir.writing(tmp_path, "part0of2"):
        with outdir.writing(tmp_path, "part1of2"):
            pass
        with pytest.raises(PreprocessError, match="part0of2 is already being written"):
            with outdir.writing(tmp_path, "part0of2"):
                pass
        with pytest.raises(PreprocessError, match="another preprocess run is writing"):
            with outdir.writing(tmp_path):
                pass
    with outdir.writing(tmp_path):
        with pytest.raises(PreprocessError, match="without --shard is writing there"):
            with outdir.writing(tmp_path, "part1of2"):
                pass


def test_a_part_cleans_only_its_own_leftovers(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "crops" / "A").mkdir(parents=True)
    mine = [
        tmp_path / "shards" / "t-1-part0of2-00003.array_record",
        tmp_path / "crops" / "A" / "x#0.jpg.tmp",
    ]
    theirs = [
        tmp_path / "shards" / "t-2-part1of2-00000.array_record",
        tmp_path / "shards" / "t-2-part1of2-00001.csv.tmp",
        tmp_path / "crops" / "A" / "y#0.jpg.tmp",
    ]
    for path in mine + theirs:
        path.write_bytes(b"half")
    assert outdir.remove_leftovers(tmp_path, "part0of2", frozenset({"A/x"})) == 2
    assert not any(p.exists() for p in mine) and all(p.exists() for p in theirs)
    assert outdir.remove_leftovers(tmp_path) == 3
