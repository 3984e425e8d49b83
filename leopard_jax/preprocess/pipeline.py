"""Photos -> dataset dir: list, skip what is done, process in worker processes, commit shards.

Work is never lost: a worker writes the crop/edge JPEGs of a photo before returning its
records; the main process commits a shard (records.ShardWriter: CSV renamed last) every
`shard_size` photos and appends that chunk's rejections to rejected.csv in one write + fsync.
A rerun skips every source in a committed shard or in rejected.csv (records.done_sources),
so a SIGKILL costs at most the photos since the last commit, and nothing half-written is
ever visible. Results come back in input order, so shard contents do not depend on --workers.
"""

from __future__ import annotations

import collections
import concurrent.futures
from concurrent.futures.process import BrokenProcessPool
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import itertools
import multiprocessing
import os
import pathlib
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import cv2
import numpy as np

from leopard_jax.data import records
from leopard_jax.preprocess import background, detect, edges, inputs, render

REJECTED_FIELDS = ("source", "identity", "reason")
# Settings that may change between runs into one dataset without changing any record.
_RUN_ONLY = ("input", "output", "workers", "onnx_threads", "shard_size")
_LOCK_FILE = ".preprocess.lock"


class PreprocessError(RuntimeError):
    """A setup problem (settings, models, output dir); the message is one actionable line."""


@dataclasses.dataclass
class PhotoResult:
    records: list[tuple[dict[str, str], np.ndarray]]
    rejected: str | None = None  # the reason when the photo produced no record


@dataclasses.dataclass
class Summary:
    listed: int = 0
    skipped: int = 0
    processed: int = 0
    records: int = 0
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    seconds: float = 0.0
    shards: int = 0

    @property
    def ok(self) -> bool:
        """Non-zero exit only when there was work and none of it gave a record."""
        return self.processed == 0 or self.records > 0

    def line(self, output: str) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in self.rejected.most_common())
        rate = self.processed / self.seconds if self.seconds else 0.0
        return (
            f"done: {self.processed} photos -> {self.records} records in {self.shards} shards, "
            f"{sum(self.rejected.values())} rejected{f' ({why})' if why else ''}, "
            f"{self.skipped} skipped as already done; {self.seconds:.1f} s, {rate:.2f} photos/s; {output}"
        )


# ----------------------------------------------------------------------------- settings


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_settings(config) -> dict[str, Any]:
    """Validated plain-dict settings with every 'auto' made explicit (what settings.json holds)."""
    s = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    s = {k: (dict(v) if isinstance(v, dict) else v) for k, v in s.items()}
    if not s.get("input"):
        raise PreprocessError("--input is required: a folder of photos or a CSV path,identity[,flank]")
    if not s.get("output"):
        raise PreprocessError("--output is required: the dataset folder to write (created if missing)")
    det, bg = s["detector"], s["background"]
    if not det["model"]:
        raise PreprocessError(
            "--detector is required: an ONNX detector (e.g. MegaDetector v5 exported to ONNX) or "
            "'none' for photos that are already crops"
        )
    det["model"] = str(det["model"])
    if det["model"].lower() != "none":
        if not os.path.isfile(det["model"]):
            raise PreprocessError(f"--detector {det['model']}: no such file; give an ONNX file or 'none'")
        det["sha256"] = _sha256(det["model"])
    bg["model"] = str(bg["model"] or "none")
    use_bg = bg["model"].lower() != "none"
    if use_bg and background.is_model_file(bg["model"]):
        if not os.path.isfile(bg["model"]):
            raise PreprocessError(f"--background {bg['model']}: no such file; give a .onnx file or a rembg model name")
        bg["sha256"] = _sha256(bg["model"])
    if s["edges"]["source"] == "auto":
        s["edges"]["source"] = "removed" if use_bg else "crop"
    for name, value in (("rgb_source", s["rgb_source"]), ("edges.source", s["edges"]["source"])):
        if value not in ("crop", "removed"):
            raise PreprocessError(f"{name}={value!r}: use crop or removed")
        if value == "removed" and not use_bg:
            raise PreprocessError(f"{name}=removed needs a background model: --background u2netp (or a .onnx file)")
    if s["render"]["mode"] not in render.MODES:
        raise PreprocessError(f"render.mode={s['render']['mode']!r}: use one of {render.MODES}")
    k = s["edges"]["blur_ksize"]
    if k < 0 or (k and k % 2 == 0):
        raise PreprocessError(f"edges.blur_ksize={k}: use an odd size (e.g. 5) or 0 for no blur")
    if s["shard_size"] < 1:
        raise PreprocessError(f"shard_size={s['shard_size']}: use at least 1")
    cores = os.cpu_count() or 1
    if s["workers"] == 0:
        s["workers"] = cores
    if s["onnx_threads"] == 0:
        s["onnx_threads"] = max(1, cores // max(1, s["workers"]))
    return s


def dataset_settings(s: dict[str, Any]) -> dict[str, Any]:
    """What settings.json stores: the record shape and every setting that shaped a record."""
    kept = {k: v for k, v in s.items() if k not in _RUN_ONLY}
    return {"height": s["render"]["height"], "width": s["render"]["width"], "channels": 4, **kept}


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings without model paths (a moved model with the same sha256 is the same model)."""
    out = {k: v for k, v in settings.items() if k not in ("format_version", *_RUN_ONLY)}
    for section in ("detector", "background"):
        if isinstance(out.get(section), dict) and "sha256" in out[section]:
            out[section] = {k: v for k, v in out[section].items() if k != "model"}
    return out


def check_same_settings(output: pathlib.Path, settings: dict[str, Any]) -> None:
    """A resumed run must render records exactly as the first run did."""
    path = output / records.SETTINGS_FILE
    if not path.is_file():
        return
    old, new = _comparable(records.load_settings(output)), _comparable(settings)
    if old == new:
        return
    flat = lambda d, p="": {  # noqa: E731
        f"{p}{k}": v for key, val in d.items() for k, v in (flat(val, f"{key}.").items() if isinstance(val, dict) else [(key, val)])
    }
    old_f, new_f = flat(old), flat(new)
    diff = [f"{k}: {old_f.get(k)!r} -> {new_f.get(k)!r}" for k in sorted(old_f.keys() | new_f.keys()) if old_f.get(k) != new_f.get(k)]
    raise PreprocessError(
        f"{output} was made with other settings ({'; '.join(diff[:4])}); use a new --output folder "
        "or the settings in its settings.json"
    )


# ----------------------------------------------------------------------------- stages


@dataclasses.dataclass
class Stages:
    """The per-process models and settings one photo needs; built once per worker."""

    settings: dict[str, Any]
    detector: detect.Detector | None
    remover: background.BackgroundRemover | None


def build_stages(settings: dict[str, Any]) -> Stages:
    det, bg, threads = settings["detector"], settings["background"], settings["onnx_threads"]
    cv2.setNumThreads(threads)
    detector = None
    if det["model"].lower() != "none":
        detector = detect.Detector(
            det["model"],
            fmt=det["format"],
            input_size=det["input_size"],
            classes=det["classes"],
            threshold=det["threshold"],
            iou_threshold=det["iou"],
            max_detections=det["max_detections"],
            threads=threads,
        )
    remover = None
    if bg["model"].lower() != "none":
        remover = background.BackgroundRemover(
            bg["model"], custom_session=bg["custom_session"], fill=bg["fill"], threads=threads
        )
    return Stages(settings, detector, remover)


def crop_boxes(stages: Stages, rgb: np.ndarray) -> list[tuple[tuple[int, int, int, int], float | None]]:
    """Padded integer boxes (with scores) of the animals to keep; the whole photo without a detector."""
    height, width = rgb.shape[:2]
    if stages.detector is None:
        return [((0, 0, width, height), None)]
    det = stages.settings["detector"]
    boxes = []
    for d in stages.detector(rgb):
        box = detect.pad_box(d.box, det["padding"], (height, width))
        if min(box[2] - box[0], box[3] - box[1]) >= det["min_box_side"]:
            boxes.append((box, d.score))
    return boxes


def render_crop(stages: Stages, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One crop -> (RGB shown, edge map at crop size, H×W×4 record)."""
    s = stages.settings
    removed = stages.remover(crop)[0] if stages.remover is not None else crop
    rgb = removed if s["rgb_source"] == "removed" else crop
    edge_input = removed if s["edges"]["source"] == "removed" else crop
    e = s["edges"]
    edge = edges.edge_map(
        edge_input,
        equalize=e["equalize"],
        blur_ksize=e["blur_ksize"],
        blur_sigma=e["blur_sigma"],
        canny_low=e["canny_low"],
        canny_high=e["canny_high"],
        l2_gradient=e["l2_gradient"],
    )
    r = s["render"]
    record = render.render(rgb, edge, r["height"], r["width"], r["mode"], r["pad_value"])
    return rgb, edge, record


def _write_jpeg(path: pathlib.Path, image: np.ndarray, quality: int, max_side: int) -> None:
    """Atomic (temp + rename): a killed worker leaves no truncated preview."""
    height, width = image.shape[:2]
    if max_side and max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise OSError(f"could not encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.tobytes())
    os.replace(tmp, path)


def process_photo(stages: Stages, photo: inputs.Photo, output: pathlib.Path) -> PhotoResult:
    """One photo -> its records (one per animal), previews written; or the reason it has none."""
    s = stages.settings
    try:
        rgb = inputs.load_image(photo.source, s["min_image_side"])
    except inputs.ImageError as e:
        return PhotoResult([], str(e))
    boxes = crop_boxes(stages, rgb)
    if not boxes:
        return PhotoResult([], f"no animal detected (threshold {s['detector']['threshold']})")
    out = []
    for i, (box, score) in enumerate(boxes):
        key = f"{photo.name}#{i}"
        x0, y0, x1, y1 = box
        shown, edge, record = render_crop(stages, rgb[y0:y1, x0:x1])
        crop_rel, edge_rel = f"crops/{key}.jpg", f"edges/{key}.jpg"
        _write_jpeg(output / crop_rel, shown, s["jpeg_quality"], s["jpeg_max_side"])
        _write_jpeg(output / edge_rel, edge, s["jpeg_quality"], s["jpeg_max_side"])
        row = {
            "key": key,
            "source": photo.source,
            "identity": photo.identity,
            "flank": photo.flank,
            "box": " ".join(str(v) for v in box) if stages.detector is not None else "",
            "score": f"{score:.4f}" if score is not None else "",
            "crop": crop_rel,
            "edge": edge_rel,
        }
        out.append((row, record))
    return PhotoResult(out)


def process_safely(stages: Stages, photo: inputs.Photo, output: pathlib.Path) -> PhotoResult:
    """Any failure on one photo is its rejection reason, never the end of the run."""
    try:
        return process_photo(stages, photo, output)
    except MemoryError:
        return PhotoResult([], "out of memory while processing (photo too large?)")
    except Exception as e:  # noqa: BLE001 - a bad photo must not stop thousands of good ones
        return PhotoResult([], f"failed: {type(e).__name__}: {e}")


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
def _results(settings: dict[str, Any], output: pathlib.Path, photos: list[inputs.Photo], stages: Stages | None):
    """Yields an iterator of (photo, PhotoResult), from worker processes or (workers=-1) inline."""
    if settings["workers"] < 0:
        stages = stages or build_stages(settings)
        yield ((p, process_safely(stages, p, output)) for p in photos)
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        settings["workers"], mp_context=ctx, initializer=_init_worker, initargs=(settings, str(output))
    ) as pool:
        try:
            yield _ordered(lambda p: pool.submit(_work, p), photos, 4 * settings["workers"])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- output files


@contextlib.contextmanager
def _exclusive(output: pathlib.Path):
    """One writer per dataset dir (an flock: released by the kernel if we are killed)."""
    with open(output / _LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PreprocessError(f"{output}: another preprocess run is writing there; wait for it or use another --output") from None
        yield


def prepare_rejected(output: pathlib.Path) -> pathlib.Path:
    """rejected.csv with its header; a line cut short by a kill is dropped (it is redone)."""
    path = output / records.REJECTED_FILE
    text = path.read_text() if path.is_file() else ""
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    if not text:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(REJECTED_FIELDS)
        text = buf.getvalue()
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def append_rejected(path: pathlib.Path, rows: list[tuple[str, str, str]]) -> None:
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


def remove_leftovers(output: pathlib.Path) -> int:
    """Files a killed run left half-done (temp files, records without their CSV); readers
    never saw them, and the photos behind them are redone. Only call while holding the lock."""
    shards = output / records.SHARDS_DIR
    stale = [p for p in shards.glob("*.array_record") if not p.with_suffix(".csv").exists()]
    for folder in (shards, output / "crops", output / "edges"):
        if folder.is_dir():
            stale.extend(folder.rglob("*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _existing_keys(output: pathlib.Path) -> set[str]:
    return {row["key"].rsplit("#", 1)[0] for row in records.read_manifest(output)}


# ----------------------------------------------------------------------------- run


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="photo", dynamic_ncols=True, mininterval=1.0, file=sys.stderr, smoothing=0.1)


def run(config, *, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Summary:
    """The whole job. Raises PreprocessError / inputs.InputError for setup problems."""
    settings = resolve_settings(config)
    output = pathlib.Path(settings["output"])
    photos = inputs.list_photos(settings["input"], settings["labels"])
    if output.exists() and not output.is_dir():
        raise PreprocessError(f"--output {output}: exists and is not a folder; choose a folder path")
    output.mkdir(parents=True, exist_ok=True)
    summary = Summary(listed=len(photos))
    started = time.time()
    with _exclusive(output):
        saved = dataset_settings(settings)
        check_same_settings(output, saved)
        remove_leftovers(output)
        done = records.done_sources(output)
        todo = [p for p in photos if p.source not in done]
        summary.skipped = len(photos) - len(todo)
        # Key names already used by committed records stay theirs (a.jpg done, a.png new).
        todo = inputs.unique_names(todo, _existing_keys(output))
        log(
            f"{len(photos)} photos listed, {summary.skipped} already done, {len(todo)} to process "
            f"with {settings['workers'] if settings['workers'] > 0 else 'no'} worker processes "
            f"(detector: {settings['detector']['model']}, background: {settings['background']['model']})"
        )
        stages = None  # worker processes build their own (and report a failure on their first photo)
        if settings["workers"] < 0 and todo:
            try:
                stages = build_stages(settings)
            except (OSError, ValueError, RuntimeError) as e:
                raise PreprocessError(str(e)) from None
        records.save_settings(output, saved)
        rejected_path = prepare_rejected(output)
        _write_all(settings, output, todo, stages, rejected_path, summary)
    summary.seconds = time.time() - started
    return summary


def _write_all(settings, output, todo, stages, rejected_path, summary: Summary) -> None:
    # Shard names sort by run start time, so read_manifest lists older runs first.
    now = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}-{os.getpid()}"
    writer, rejected, in_chunk = None, [], 0
    seq = (f"{run_id}-{i:05d}" for i in itertools.count() if not (output / records.SHARDS_DIR / f"{run_id}-{i:05d}.csv").exists())

    def commit():
        nonlocal writer, rejected, in_chunk
        if writer is not None:
            summary.shards += bool(len(writer))
            writer.close()
        append_rejected(rejected_path, rejected)
        writer, rejected, in_chunk = None, [], 0

    bar = _progress(len(todo))
    try:
        with _results(settings, output, todo, stages) as results:
            for photo, result in results:
                if result.rejected is not None:
                    rejected.append((photo.source, photo.identity, result.rejected))
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
            "a worker process died (out of memory? try fewer --workers); finished photos are saved, "
            "rerun the same command to resume"
        ) from None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
