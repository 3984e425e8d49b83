"""Photos -> dataset dir: list, skip what is done, process in worker processes, commit shards.

Work is never lost: a worker writes the crop/edge JPEGs of an item before returning its
records; the main process commits a shard (records.ShardWriter: CSV renamed last) every
`shard_size` items and appends that chunk's rejections to rejected.csv in one write + fsync.
A rerun skips every item in a committed shard or a rejected file (records.done_items), so a
SIGKILL costs at most the items since the last commit, and nothing half-written is ever
visible. Results come back in input order, so shard contents do not depend on --workers.

`--shard I/N` runs part I of N (every N-th item from the I-th): parts run at once, on one
machine or a cluster's job array, into one dataset dir (outdir.py keeps them apart); the
dataset is complete when every part has finished, and each part resumes on its own.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import pathlib
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from leopard_jax.data import records
from leopard_jax.preprocess import inputs, outdir
from leopard_jax.preprocess.settings import (
    PreprocessError,
    check_same_settings,
    dataset_settings,
    parse_shard,
    require_detector,
    resolve_settings,
)
from leopard_jax.preprocess.stages import PhotoResult, Stages, build_stages, process_safely


@dataclasses.dataclass
class Summary:
    listed: int = 0
    skipped: int = 0
    processed: int = 0
    records: int = 0
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    seconds: float = 0.0
    shards: int = 0
    part: str = ""  # "part1of4" for --shard 1/4

    @property
    def ok(self) -> bool:
        """Non-zero exit only when there was work and none of it gave a record."""
        return self.processed == 0 or self.records > 0

    def line(self, output: str) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in self.rejected.most_common())
        rate = self.processed / self.seconds if self.seconds else 0.0
        return (
            f"done: {self.processed} items -> {self.records} records in {self.shards} shards, "
            f"{sum(self.rejected.values())} rejected{f' ({why})' if why else ''}, "
            f"{self.skipped} skipped as already done; {self.seconds:.1f} s, {rate:.2f} "
            f"items/s; {output}"
            + (f" ({self.part}: complete once every part has run)" if self.part else "")
        )


# ----------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


class WorkerSetupError(RuntimeError):
    """A worker could not build its models; carries the one-line reason to the main process."""


def _init_worker(settings: dict[str, Any], output: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _WORKER["output"] = pathlib.Path(output)
    try:
        _WORKER["stages"] = build_stages(settings)
    except Exception as e:  # noqa: BLE001 - reported on the first task, as one line
        _WORKER["error"] = f"{e}"


def _work(photo: inputs.Photo) -> PhotoResult:
    if "error" in _WORKER:
        raise WorkerSetupError(_WORKER["error"])
    return process_safely(_WORKER["stages"], photo, _WORKER["output"])


def _ordered(submit: Callable, items: Iterable, window: int) -> Iterator[tuple[Any, Any]]:
    """(item, result) in input order with at most `window` items in flight (bounded memory)."""
    items = iter(items)
    pending = collections.deque((item, submit(item)) for item in itertools.islice(items, window))
    while pending:
        item, future = pending.popleft()
        for nxt in itertools.islice(items, 1):
            pending.append((nxt, submit(nxt)))
        yield item, future.result()


@contextlib.contextmanager
def _results(
    settings: dict[str, Any],
    output: pathlib.Path,
    photos: list[inputs.Photo],
    stages: Stages | None,
):
    """Yields an iterator of (photo, PhotoResult), from worker processes or (workers=-1) inline."""
    if settings["workers"] < 0:
        stages = stages or build_stages(settings)
        yield ((p, process_safely(stages, p, output)) for p in photos)
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        settings["workers"],
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(settings, str(output)),
    ) as pool:
        try:
            yield _ordered(lambda p: pool.submit(_work, p), photos, 4 * settings["workers"])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _existing_keys(output: pathlib.Path) -> set[str]:
    return {row["key"].rsplit("#", 1)[0] for row in records.read_manifest(output)}


# ----------------------------------------------------------------------------- run


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="item",
        dynamic_ncols=True,
        mininterval=1.0,
        file=sys.stderr,
        smoothing=0.1,
    )


def list_items(settings: dict[str, Any]) -> list[inputs.Photo]:
    """This run's items: all of --input, or every N-th from the I-th with --shard I/N (the
    names are made unique over the whole input first, so every part agrees on them)."""
    photos = inputs.list_photos(
        settings["input"],
        settings["labels"],
        images=settings["images"] or None,
        identity_field=settings["identity_field"],
        split_field=settings["split_field"],
    )
    require_detector(settings, all(p.box is not None for p in photos))
    part, parts = parse_shard(settings["shard"])
    return photos[part::parts]


def run(config, *, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Summary:
    """The whole job. Raises PreprocessError / inputs.InputError for setup problems."""
    settings = resolve_settings(config)
    output = pathlib.Path(settings["output"])
    photos = list_items(settings)
    if output.exists() and not output.is_dir():
        raise PreprocessError(
            f"--output {output}: exists and is not a folder; choose a folder path"
        )
    output.mkdir(parents=True, exist_ok=True)
    tag = outdir.part_tag(*parse_shard(settings["shard"]))
    summary = Summary(listed=len(photos), part=tag)
    started = time.time()
    with outdir.writing(output, tag):
        saved = dataset_settings(settings)
        check_same_settings(output, saved)
        outdir.remove_leftovers(output, tag, frozenset(p.name for p in photos))
        done = records.done_items(output)
        todo = [p for p in photos if (p.source, p.annotation) not in done]
        summary.skipped = len(photos) - len(todo)
        # Key names already used by committed records stay theirs (a.jpg done, a.png new).
        todo = inputs.unique_names(todo, _existing_keys(output))
        log(
            f"{len(photos)} items listed{f' ({tag})' if tag else ''}, {summary.skipped} already "
            f"done, {len(todo)} to process with "
            f"{settings['workers'] if settings['workers'] > 0 else 'no'} worker processes "
            f"(detector: {settings['detector']['model']}, background: "
            f"{settings['background']['model']})"
        )
        # Worker processes build their own stages (and report a failure on their first item).
        stages = None
        if settings["workers"] < 0 and todo:
            try:
                stages = build_stages(settings)
            except (OSError, ValueError, RuntimeError) as e:
                raise PreprocessError(str(e)) from None
        outdir.agree_settings(output, saved)
        rejected_path = outdir.prepare_rejected(output, tag)
        _write_all(settings, output, todo, stages, rejected_path, summary)
    summary.seconds = time.time() - started
    return summary


def _write_all(settings, output, todo, stages, rejected_path, summary: Summary) -> None:
    # Shard names sort by run start time, so read_manifest lists older runs first.
    now = time.time()
    run_id = (
        time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        + f"{int(now * 1000) % 1000:03d}-{os.getpid()}"
    )
    run_id += f"-{summary.part}" if summary.part else ""
    writer, rejected, in_chunk = None, [], 0
    seq = (
        f"{run_id}-{i:05d}"
        for i in itertools.count()
        if not (output / records.SHARDS_DIR / f"{run_id}-{i:05d}.csv").exists()
    )

    def commit():
        nonlocal writer, rejected, in_chunk
        if writer is not None:
            summary.shards += bool(len(writer))
            writer.close()
        outdir.append_rejected(rejected_path, rejected)
        writer, rejected, in_chunk = None, [], 0

    bar = _progress(len(todo))
    try:
        with _results(settings, output, todo, stages) as results:
            for photo, result in results:
                if result.rejected is not None:
                    rejected.append(
                        (photo.source, photo.identity, result.rejected, photo.annotation)
                    )
                    summary.rejected[result.rejected.split(" (")[0].split(":")[0]] += 1
                for row, record in result.records:
                    if writer is None:
                        writer = records.ShardWriter(output, next(seq))
                    writer.add(row, record)
                    summary.records += 1
                summary.processed += 1
                in_chunk += 1
                bar.update(1)
                if in_chunk >= settings["shard_size"]:
                    commit()
        commit()
    except KeyboardInterrupt:
        commit()  # everything finished so far is kept; the rest is redone on rerun
        raise
    except WorkerSetupError as e:
        commit()
        raise PreprocessError(str(e)) from None
    except BrokenProcessPool:
        commit()
        raise PreprocessError(
            "a worker process died (out of memory? try fewer --workers); finished photos are "
            "saved, "
            "rerun the same command to resume"
        ) from None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
