"""The whole job: bad files, resume, a SIGKILL mid-run, settings drift, CLI errors."""

import csv
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from leopard_jax.data import records
from leopard_jax.preprocess import config as preprocess_config
from leopard_jax.preprocess import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]


def settings(input_path, output, **overrides):
    c = preprocess_config.get_config()
    c.input, c.output, c.detector.model, c.workers = str(input_path), str(output), "none", -1
    c.render.height, c.render.width = 32, 64
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def photo(path, seed, size=(48, 80)):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def rejected_rows(output):
    with open(output / records.REJECTED_FILE, newline="") as f:
        return {pathlib.Path(r["source"]).name: r["reason"] for r in csv.DictReader(f)}


def records_by_key(output):
    source = records.RecordSource(output)
    return {row["key"]: source[i] for i, row in enumerate(source.rows)}


def cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "leopard_jax.preprocess", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        **kwargs,
    )


def test_bad_files_are_rejected_and_the_run_goes_on(tmp_path, monkeypatch):
    src = tmp_path / "in" / "L1_left"
    for i in range(3):
        photo(src / f"good{i}.jpg", i)
    good = (src / "good0.jpg").read_bytes()
    (src / "cut.jpg").write_bytes(good[: len(good) // 3])
    (src / "corrupt.jpg").write_bytes(good[:200] + bytes(range(256)) * 8)
    (src / "text.png").write_text("not an image")
    (src / "zero.jpg").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(src / "dot.png")
    locked = photo(src / "locked.jpg", 9)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the read fail as it would for a user
        real = pathlib.Path.read_bytes
        monkeypatch.setattr(
            pathlib.Path,
            "read_bytes",
            lambda p: (
                (_ for _ in ()).throw(PermissionError(13, "denied"))
                if p.name == "locked.jpg"
                else real(p)
            ),
        )
    out = tmp_path / "out"
    summary = pipeline.run(settings(tmp_path / "in", out), log=lambda m: None)
    assert summary.ok and summary.records == 3 and summary.processed == 9
    reasons = rejected_rows(out)
    assert set(reasons) == {
        "cut.jpg",
        "corrupt.jpg",
        "text.png",
        "zero.jpg",
        "dot.png",
        "locked.jpg",
    }
    assert "truncated" in reasons["cut.jpg"] and "not an image" in reasons["text.png"]
    assert "empty" in reasons["zero.jpg"] and "too small" in reasons["dot.png"]
    assert "permission denied" in reasons["locked.jpg"]
    rows = records.read_manifest(out)
    assert sorted(r["key"] for r in rows) == [f"L1_left/good{i}#0" for i in range(3)]
    assert all(r["identity"] == "L1_left" and r["flank"] == "left" for r in rows)
    for r in rows:
        assert (out / r["crop"]).is_file() and (out / r["edge"]).is_file()
    assert records.load_settings(out)["channels"] == 4
    # A rerun has nothing to do; a new photo alone is processed.
    photo(src / "good3.jpg", 3)
    again = pipeline.run(settings(tmp_path / "in", out), log=lambda m: None)
    assert (again.processed, again.skipped, again.records) == (1, 9, 1)
    assert len(records.read_manifest(out)) == 4 and len(rejected_rows(out)) == 6


def test_other_settings_on_resume_are_refused(tmp_path):
    photo(tmp_path / "in" / "a.jpg", 0)
    pipeline.run(settings(tmp_path / "in", tmp_path / "out"), log=lambda m: None)
    with pytest.raises(pipeline.PreprocessError, match="canny_low: 55 -> 40"):
        pipeline.run(
            settings(tmp_path / "in", tmp_path / "out", **{"edges.canny_low": 40}),
            log=lambda m: None,
        )


def test_leftovers_of_a_killed_run_are_cleaned_and_redone(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.jpg").write_bytes(b"junk")
    photo(tmp_path / "in" / "ok.jpg", 1)
    out = tmp_path / "out"
    out.mkdir()
    # killed mid-line
    (out / records.REJECTED_FILE).write_text(f"source,identity,reason\n{tmp_path}/in/bad.j")
    (out / "shards").mkdir()
    leftovers = [
        out / "shards" / "old-00000.array_record",
        out / "shards" / "old-00001.csv.tmp",
        out / "crops" / "k#0.jpg.tmp",
    ]
    (out / "crops").mkdir()
    for path in leftovers:
        path.write_bytes(b"half")
    pipeline.run(settings(tmp_path / "in", out), log=lambda m: None)
    assert not any(path.exists() for path in leftovers)
    text = (out / records.REJECTED_FILE).read_text()
    assert text.endswith("\n") and list(rejected_rows(out)) == ["bad.jpg"]


def test_cli_errors_and_exit_codes(tmp_path):
    missing = cli(
        "--input", str(tmp_path / "typo"), "--output", str(tmp_path / "o"), "--detector", "none"
    )
    assert missing.returncode == 2
    assert (
        missing.stderr.strip().splitlines()[-1].startswith("error: --input")
        and "no such file" in missing.stderr
    )
    (tmp_path / "empty").mkdir()
    empty = cli(
        "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o"), "--detector", "none"
    )
    assert empty.returncode == 2 and "no photos found" in empty.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.jpg").write_bytes(b"junk")
    nothing = cli(
        "--config",
        "configs/preprocess.py",
        "--config.render.width=128",
        "--input",
        str(tmp_path / "junk"),
        "--output",
        str(tmp_path / "o"),
        "--detector",
        "none",
        "--workers=-1",
    )
    assert (
        nothing.returncode == 1 and "0 records" in nothing.stderr and "1 rejected" in nothing.stderr
    )
    # the config file and its override were read
    assert records.load_settings(tmp_path / "o")["width"] == 128


def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path):
    n = 40
    for i in range(n):
        photo(tmp_path / "in" / f"ID{i % 4}" / f"p{i:02d}.jpg", i, size=(200, 400))
    out = tmp_path / "out"
    args = [
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--detector",
        "none",
        "--config.shard_size=2",
        "--config.render.height=32",
        "--config.render.width=64",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "leopard_jax.preprocess", *args, "--workers=1"],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not records.shard_names(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker
    proc.wait()
    committed = len(records.read_manifest(out))
    assert 0 < committed < n, "the kill must land mid-run for this test to mean anything"
    resumed = cli(*args, "--workers=-1")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{committed} skipped" in resumed.stderr
    rows = records.read_manifest(out)
    assert not list(out.rglob("*.tmp"))
    assert sorted(p.stem for p in (out / "shards").glob("*.array_record")) == records.shard_names(
        out
    )
    assert sorted(r["source"] for r in rows) == sorted(
        str(p) for p in (tmp_path / "in").rglob("*.jpg")
    )
    assert len({r["key"] for r in rows}) == n
    # Same records as one uninterrupted run.
    clean = tmp_path / "clean"
    pipeline.run(settings(tmp_path / "in", clean), log=lambda m: None)
    got, want = records_by_key(out), records_by_key(clean)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("workers", [-1, 1])
def test_a_broken_model_is_one_clear_error(tmp_path, workers):
    photo(tmp_path / "in" / "a.jpg", 0)
    (tmp_path / "det.onnx").write_bytes(b"not a model")
    c = settings(
        tmp_path / "in",
        tmp_path / "out",
        workers=workers,
        **{"detector.model": str(tmp_path / "det.onnx")},
    )
    with pytest.raises(pipeline.PreprocessError, match="det.onnx: not a loadable ONNX model") as e:
        pipeline.run(c, log=lambda m: None)
    assert "\n" not in str(e.value)
    assert records.read_manifest(tmp_path / "out") == []
    assert not (tmp_path / "out" / records.REJECTED_FILE).is_file() or not rejected_rows(
        tmp_path / "out"
    )


def test_help_lists_every_flag_and_a_bad_flag_is_one_line():
    shown = cli("--help")
    assert shown.returncode == 0
    for flag in (
        "--config",
        "--input",
        "--images",
        "--output",
        "--detector",
        "--background",
        "--labels",
        "--workers",
        "--shard",
    ):
        assert flag in shown.stdout
    bad = cli("--input", "x", "--bogus")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: Unknown command line flag 'bogus'; see python -m leopard_jax.preprocess --help"
    )
