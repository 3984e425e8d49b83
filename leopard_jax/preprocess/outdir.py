"""The dataset dir while a run writes it: who may write, settings.json agreed, the rejected
file, half-done leftovers.

A whole run holds `.preprocess.lock` exclusively. A `--shard I/N` part holds it shared (so
parts run together but never beside a whole run) and `.preprocess-partIofN.lock`
exclusively (so one part never runs twice at once). flock locks die with their process.
Everything a part writes carries its tag (`partIofN`): shard names, its rejected file, and
the leftovers it may clean, so parts never touch each other's files.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import pathlib
from collections.abc import Iterator
from typing import Any

from leopard_jax.data import records
from leopard_jax.preprocess.settings import PreprocessError, check_same_settings

_LOCK = ".preprocess"


def part_tag(part: int, parts: int) -> str:
    """ "" for a whole run, "part1of4" for `--shard 1/4`."""
    return f"part{part}of{parts}" if parts > 1 else ""


def _lock(path: pathlib.Path, mode: int, busy: str, stack: contextlib.ExitStack) -> None:
    """flock `path` while `stack` is open; `busy` is the error when another process holds it
    (blocking until it is free when `busy` is empty)."""
    lock = stack.enter_context(open(path, "w"))
    try:
        fcntl.flock(lock, mode | (fcntl.LOCK_NB if busy else 0))
    except BlockingIOError:
        raise PreprocessError(busy) from None
    except OSError as e:
        raise PreprocessError(
            f"{path}: cannot lock ({e.strerror}); put --output on a filesystem with flock "
            "(local disk, NFSv4, Lustre mounted with -o flock)"
        ) from None


@contextlib.contextmanager
def writing(output: pathlib.Path, tag: str = "") -> Iterator[None]:
    """Hold the dataset dir for a whole run (tag "") or for one part."""
    with contextlib.ExitStack() as stack:
        if not tag:
            _lock(
                output / f"{_LOCK}.lock",
                fcntl.LOCK_EX,
                (
                    f"{output}: another preprocess run is writing there; wait for it or use "
                    "another --output"
                ),
                stack,
            )
        else:
            _lock(
                output / f"{_LOCK}.lock",
                fcntl.LOCK_SH,
                (f"{output}: a preprocess run without --shard is writing there; wait for it"),
                stack,
            )
            _lock(
                output / f"{_LOCK}-{tag}.lock",
                fcntl.LOCK_EX,
                (
                    f"{output}: {tag} is already being written by another process; run each "
                    "--shard I/N once at a time"
                ),
                stack,
            )
        yield


def agree_settings(output: pathlib.Path, settings: dict[str, Any]) -> None:
    """Check and write settings.json as one step: parts starting together cannot disagree."""
    with contextlib.ExitStack() as stack:
        _lock(output / ".settings.lock", fcntl.LOCK_EX, "", stack)
        check_same_settings(output, settings)
        records.save_settings(output, settings)


def prepare_rejected(output: pathlib.Path, tag: str = "") -> pathlib.Path:
    """The run's rejected file with its header; a line cut short by a kill is dropped (it is
    redone), and a header from before the `annotation` column gains it."""
    path = records.rejected_path(output, tag)
    text = path.read_text() if path.is_file() else ""
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(records.REJECTED_FIELDS)
    header = buf.getvalue()
    if not text or text.startswith("source,identity,reason\n"):
        text = header + text.partition("\n")[2]
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def append_rejected(path: pathlib.Path, rows: list[tuple[str, str, str, str]]) -> None:
    """All rows in one O_APPEND write, then fsync: whole lines or (if killed) a cut last line
    that prepare_rejected drops."""
    if not rows:
        return
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, buf.getvalue().encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _preview_name(path: pathlib.Path, folder: pathlib.Path) -> str:
    """crops/<name>#<i>.jpg.tmp -> <name>."""
    return path.relative_to(folder).as_posix().removesuffix(".jpg.tmp").rsplit("#", 1)[0]


def remove_leftovers(
    output: pathlib.Path, tag: str = "", names: frozenset[str] = frozenset()
) -> int:
    """Files a killed run left half-done (temp files, records without their CSV); readers
    never saw them, and the items behind them are redone. A whole run removes all of them;
    a part only its own (its tag, or previews of its item `names`). Hold `writing` first."""
    shards = output / records.SHARDS_DIR
    mine = (lambda name: f"-{tag}-" in name) if tag else (lambda name: True)
    stale = [
        p
        for p in shards.glob("*.array_record")
        if not p.with_suffix(".csv").exists() and mine(p.stem)
    ]
    stale += [p for p in shards.glob("*.tmp") if mine(p.name)]
    for folder in (output / "crops", output / "edges"):
        if folder.is_dir():
            stale += [
                p for p in folder.rglob("*.tmp") if not tag or _preview_name(p, folder) in names
            ]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
