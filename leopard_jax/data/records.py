"""The on-disk dataset format shared by `preprocess` (writer) and `data`/`embed` (readers).

A dataset directory holds:

    settings.json              preprocessing settings; at least height, width, channels
    shards/<name>.array_record one record per animal crop: raw uint8 bytes of H×W×C (C = 4:
                               R, G, B, edge), row-major, no header
    shards/<name>.csv          the manifest rows of that shard; row i describes record i
    crops/<key>.jpg            the RGB crop as shown to people (review page)
    edges/<key>.jpg            the edge channel as shown to people
    rejected.csv               inputs that produced no record, with the reason; a run given
                               `--shard I/N` writes rejected-partIofN.csv instead
    split.json                 optional: {"train": [identity, ...], "test": [...]} (by
                               individual), and/or {"records": {"train": [key, ...], ...}}
                               (by record: a closed-set split)

Why one CSV per shard instead of one global manifest: a shard and its rows become visible
together. Both are written under a temporary name and renamed, the CSV last, so a killed
writer leaves either a complete shard+CSV or nothing a reader would see. Readers only trust
shards whose CSV exists. Several writers (`preprocess --shard I/N` on a cluster) can fill one
directory at once: shard names never clash, and the manifest is the union of all shards.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

FORMAT_VERSION = 1
SETTINGS_FILE = "settings.json"
SHARDS_DIR = "shards"
SPLIT_FILE = "split.json"
REJECTED_FILE = "rejected.csv"
REJECTED_FIELDS = ("source", "identity", "reason", "annotation")
MANIFEST_FIELDS = (
    "key",  # unique, filesystem-safe (may contain '/'), e.g. "BGL09_right/IMG_0001#0"
    "source",  # path of the original photo, as given to preprocess
    "identity",  # "" when unknown (new photos to identify)
    "flank",  # "left" / "right" / "" (unknown) / another viewpoint ("front", "up"...)
    "box",  # "x0 y0 x1 y1" in source pixels (detected or annotated), "" for a whole photo
    "score",  # detector confidence, "" when no detector chose the box
    "shard",  # shard file stem
    "index",  # record index inside the shard
    "crop",  # crop JPEG path relative to the dataset dir
    "edge",  # edge JPEG path relative to the dataset dir
    "annotation",  # the input's id of this animal in the photo (COCO annotation), "" for none
    "viewpoint",  # as annotated ("frontleft", "up"...), "" when the input has none
    "date",  # capture date as the input gives it, "" when unknown
    "split",  # the input's own split ("train"/"test"...), "" when it has none
)
# Manifests written before a field existed read it as "".
_EMPTY_ROW = dict.fromkeys(MANIFEST_FIELDS, "")
_RECORDS_SECTION = "records"
_TMP_SUFFIX = ".tmp"


class DatasetError(ValueError):
    """A dataset directory that cannot be read; the message names the path and the fix."""


def save_settings(dataset_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Write settings.json atomically (temp file, then rename)."""
    path = pathlib.Path(dataset_dir) / SETTINGS_FILE
    settings = {"format_version": FORMAT_VERSION, **settings}
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
    os.replace(tmp, path)


def load_settings(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(dataset_dir) / SETTINGS_FILE
    if not path.is_file():
        raise DatasetError(
            f"{path}: not found; is {dataset_dir} a dataset made by "
            "`python -m leopard_jax.preprocess --output DIR`?"
        )
    settings = json.loads(path.read_text())
    for field in ("height", "width", "channels"):
        if field not in settings:
            raise DatasetError(f"{path}: missing '{field}'; re-run preprocessing into a new folder")
    return settings


def record_shape(settings: dict[str, Any]) -> tuple[int, int, int]:
    return int(settings["height"]), int(settings["width"]), int(settings["channels"])


class ShardWriter:
    """Writes one shard: records and manifest rows, committed together on `close()`.

    Use as a context manager; an exception inside the block discards the shard.
    """

    def __init__(self, dataset_dir: str | os.PathLike, name: str):
        from array_record.python import array_record_module

        self.dir = pathlib.Path(dataset_dir) / SHARDS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.records_path = self.dir / f"{name}.array_record"
        self.csv_path = self.dir / f"{name}.csv"
        if self.csv_path.exists():
            raise DatasetError(f"{self.csv_path}: shard already exists; choose a new shard name")
        self._tmp_records = self.records_path.with_name(self.records_path.name + _TMP_SUFFIX)
        self._writer = array_record_module.ArrayRecordWriter(str(self._tmp_records), "group_size:1")
        self._rows: list[dict[str, str]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, row: dict[str, Any], image: np.ndarray) -> None:
        """Append one H×W×C uint8 record and its manifest row (shard/index are filled in)."""
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(
                f"record for {row.get('key')!r} must be uint8 H×W×C, got {image.dtype} "
                f"{image.shape}"
            )
        unknown = set(row) - set(MANIFEST_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown manifest fields {sorted(unknown)}; allowed: {MANIFEST_FIELDS}"
            )
        full = {field: "" for field in MANIFEST_FIELDS}
        full.update({k: "" if v is None else str(v) for k, v in row.items()})
        full["shard"], full["index"] = self.name, str(len(self._rows))
        self._writer.write(np.ascontiguousarray(image).tobytes())
        self._rows.append(full)

    def close(self) -> None:
        """Commit: rename the records file, then write and rename the CSV (the commit point)."""
        self._writer.close()
        if not self._rows:
            self._tmp_records.unlink(missing_ok=True)
            return
        os.replace(self._tmp_records, self.records_path)
        tmp_csv = self.csv_path.with_name(self.csv_path.name + _TMP_SUFFIX)
        with open(tmp_csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
            writer.writeheader()
            writer.writerows(self._rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_csv, self.csv_path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        self._tmp_records.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def shard_names(dataset_dir: str | os.PathLike) -> list[str]:
    """Committed shards (those with both files), sorted by name."""
    shards = pathlib.Path(dataset_dir) / SHARDS_DIR
    if not shards.is_dir():
        return []
    return sorted(
        p.stem for p in shards.glob("*.csv") if (shards / f"{p.stem}.array_record").is_file()
    )


def read_manifest(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """All manifest rows in a fixed order (shard name, then index). Their `split` is
    split.json's when the dataset has one (by record key, else by identity; "" when
    unlisted), else the split the input itself gave."""
    dataset_dir = pathlib.Path(dataset_dir)
    rows: list[dict[str, str]] = []
    for name in shard_names(dataset_dir):
        with open(dataset_dir / SHARDS_DIR / f"{name}.csv", newline="") as f:
            rows.extend({**_EMPTY_ROW, **row} for row in csv.DictReader(f))
    if (dataset_dir / SPLIT_FILE).is_file():
        by_identity, by_key = load_split(dataset_dir), load_record_split(dataset_dir)
        for row in rows:
            row["split"] = by_key.get(row["key"]) or by_identity.get(row["identity"], "")
    return rows


def split_of_keys(dataset_dir: str | os.PathLike) -> dict[str, str]:
    """record key -> split name ("" when none), whichever form the split takes."""
    return {row["key"]: row["split"] for row in read_manifest(dataset_dir)}


def _read_split_file(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(dataset_dir) / SPLIT_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: not valid JSON ({e}); remake it with leopard_jax.data.split"
        ) from None


def load_split(dataset_dir: str | os.PathLike) -> dict[str, str]:
    """identity -> split name, from split.json's split by individual (empty when absent)."""
    by_split = _read_split_file(dataset_dir)
    return {
        identity: name
        for name, ids in by_split.items()
        if name != _RECORDS_SECTION
        for identity in ids
    }


def load_record_split(dataset_dir: str | os.PathLike) -> dict[str, str]:
    """record key -> split name, from split.json's split by record (empty when absent)."""
    by_split = _read_split_file(dataset_dir).get(_RECORDS_SECTION, {})
    return {key: name for name, keys in by_split.items() for key in keys}


def save_split(
    dataset_dir: str | os.PathLike,
    by_split: Mapping[str, Sequence[str]],
    *,
    by_record: bool = False,
) -> None:
    """Write split.json: {name: identities}, or with `by_record` {"records": {name: keys}}."""
    path = pathlib.Path(dataset_dir) / SPLIT_FILE
    content: dict[str, Any] = {k: sorted(v) for k, v in by_split.items()}
    if by_record:
        content = {_RECORDS_SECTION: content}
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)


def rejected_path(dataset_dir: str | os.PathLike, part: str = "") -> pathlib.Path:
    """rejected.csv, or a part's own (`part` "part0of4" -> rejected-part0of4.csv)."""
    name = f"{pathlib.Path(REJECTED_FILE).stem}-{part}.csv" if part else REJECTED_FILE
    return pathlib.Path(dataset_dir) / name


def rejected_paths(dataset_dir: str | os.PathLike) -> list[pathlib.Path]:
    """rejected.csv and every part's rejected-partIofN.csv."""
    root = pathlib.Path(dataset_dir)
    return sorted(p for p in root.glob("rejected*.csv") if p.is_file())


def read_rejected(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """Rows (source, identity, reason, annotation) of every rejected file."""
    rows = []
    for path in rejected_paths(dataset_dir):
        with open(path, newline="") as f:
            rows.extend({"annotation": "", **row} for row in csv.DictReader(f, restval=""))
    return rows


def item_id(row: Mapping[str, str]) -> tuple[str, str]:
    """What one input item is: the photo and which of its annotations ("" for the photo)."""
    return row["source"], row.get("annotation") or ""


def done_items(dataset_dir: str | os.PathLike) -> set[tuple[str, str]]:
    """Items (`item_id`) already turned into records or rejected: what a resumed run skips."""
    done = {item_id(row) for row in read_manifest(dataset_dir)}
    done.update(item_id(row) for row in read_rejected(dataset_dir))
    return done


class RecordSource:
    """Random access to decoded records, in manifest order (or the order of `rows`).

    Implements grain's RandomAccessDataSource protocol (__len__, __getitem__) and pickles
    cheaply (readers are opened lazily in each worker process).
    """

    def __init__(
        self, dataset_dir: str | os.PathLike, rows: Sequence[dict[str, str]] | None = None
    ):
        self.dataset_dir = pathlib.Path(dataset_dir)
        self.shape = record_shape(load_settings(self.dataset_dir))
        self.rows = list(read_manifest(self.dataset_dir) if rows is None else rows)
        self._readers: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state

    def _reader(self, shard: str):
        if shard not in self._readers:
            from array_record.python import array_record_module

            path = self.dataset_dir / SHARDS_DIR / f"{shard}.array_record"
            self._readers[shard] = array_record_module.ArrayRecordReader(str(path))
        return self._readers[shard]

    def __getitem__(self, i: int) -> np.ndarray:
        """The uint8 H×W×C array of record i."""
        row = self.rows[int(i)]
        (raw,) = self._reader(row["shard"]).read([int(row["index"])])
        return np.frombuffer(raw, dtype=np.uint8).reshape(self.shape)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


def write_records(
    dataset_dir: str | os.PathLike, name: str, items: Iterable[tuple[dict[str, Any], np.ndarray]]
) -> int:
    """Write (row, image) pairs as one committed shard; returns the number written."""
    with ShardWriter(dataset_dir, name) as writer:
        for row, image in items:
            writer.add(row, image)
        return len(writer)
