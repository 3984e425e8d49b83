"""The `embeddings.npz` format: the one place that reads, writes and appends it.

    embeddings  float32 [N, D], unit norm
    keys        str [N]  record key in its dataset (unique within the file)
    paths       str [N]  source photo, as given to preprocess
    identities  str [N]  "" when unknown
    flanks      str [N]  "left" / "right" / ""
    crops       str [N]  absolute path of the dataset's crop JPEG ("" when unknown)
    edges       str [N]  absolute path of the dataset's edge JPEG ("" when unknown)
    meta        0-d str  JSON: model description, checkpoint, preprocessing settings,
                         dataset dir, leopard_jax version, ...

Why npz with unicode arrays: numpy reads it without pickle (`allow_pickle=False`), so a
file from someone else cannot run code, and any tool with numpy can open it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

STRING_FIELDS = ("keys", "paths", "identities", "flanks", "crops", "edges")
UNIT_NORM_TOLERANCE = 1e-3


class EmbeddingsFileError(ValueError):
    """An embeddings file that cannot be used; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """One embeddings file in memory; rows of every array line up."""

    embeddings: np.ndarray
    keys: np.ndarray
    paths: np.ndarray
    identities: np.ndarray
    flanks: np.ndarray
    crops: np.ndarray
    edges: np.ndarray
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dims(self) -> int:
        return int(self.embeddings.shape[1])


def make(embeddings: np.ndarray, meta: dict[str, Any] | None = None, **columns) -> Embeddings:
    """Build and validate; missing string columns become "" (unknown)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {embeddings.shape}")
    unknown = set(columns) - set(STRING_FIELDS)
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}; allowed: {STRING_FIELDS}")
    n = embeddings.shape[0]
    strings = {}
    for field in STRING_FIELDS:
        values = columns.get(field)
        values = np.full(n, "", dtype=str) if values is None else np.asarray(values, dtype=str)
        if values.shape != (n,):
            raise ValueError(
                f"column {field!r} has shape {values.shape}, expected ({n},) like 'embeddings'"
            )
        strings[field] = values
    return Embeddings(embeddings=embeddings, meta=dict(meta or {}), **strings)


def concat(first: Embeddings, second: Embeddings, meta: dict[str, Any] | None = None) -> Embeddings:
    """Rows of `first`, then rows of `second`; meta from `meta` (default: `first`'s)."""
    if len(first) and len(second) and first.dims != second.dims:
        raise ValueError(f"cannot append {second.dims}-d embeddings to {first.dims}-d ones")
    dims = first.dims if len(first) else second.dims
    return make(
        np.concatenate([first.embeddings.reshape(-1, dims), second.embeddings.reshape(-1, dims)]),
        meta=first.meta if meta is None else meta,
        **{f: np.concatenate([getattr(first, f), getattr(second, f)]) for f in STRING_FIELDS},
    )


def select(data: Embeddings, rows: np.ndarray) -> Embeddings:
    """The given rows (boolean mask or indices), same meta."""
    return make(
        data.embeddings[rows], meta=data.meta, **{f: getattr(data, f)[rows] for f in STRING_FIELDS}
    )


def write(path: str | os.PathLike, data: Embeddings) -> None:
    """Check, then write atomically: a temp file beside `path`, then rename, so a crash or a
    full disk leaves the previous file intact, and no file is written that `read` refuses."""
    path = pathlib.Path(path)
    if path.suffix != ".npz":
        raise EmbeddingsFileError(
            f"{path}: the output must end in .npz (numpy would append it silently)"
        )
    problem = check(data)
    if problem:
        raise EmbeddingsFileError(f"{path}: not written: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f: getattr(data, f).astype(str) for f in STRING_FIELDS}
    arrays["embeddings"] = data.embeddings.astype(np.float32)
    arrays["meta"] = np.asarray(json.dumps(data.meta, sort_keys=True, default=str))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def check(data: Embeddings) -> str | None:
    """What makes `data` unusable as an embeddings file, or None. The rules every reader
    relies on: finite unit-norm embeddings (a zero row has no direction to rank by) and
    unique, non-empty keys (the review's decisions and `--update` are keyed by them)."""
    if len(data) == 0:
        return None
    norms = np.linalg.norm(data.embeddings, axis=1)
    if not np.all(np.isfinite(data.embeddings)) or np.any(norms == 0):
        return "it holds zero or non-finite embeddings"
    if not np.all(np.abs(norms - 1) < UNIT_NORM_TOLERANCE):
        return "embeddings are not unit norm"
    empty = np.flatnonzero(data.keys == "")
    if len(empty):
        return f"keys[{empty[0]}] is empty; every image needs a unique key"
    keys, counts = np.unique(data.keys, return_counts=True)
    if np.any(counts > 1):
        key = keys[counts > 1][0]
        rows = np.flatnonzero(data.keys == key)
        return f"key {str(key)!r} appears at rows {rows[0]} and {rows[1]}; keys must be unique"
    return None


def read(path: str | os.PathLike) -> Embeddings:
    """Load and `check` an embeddings file; errors name the file and what to do."""
    path = pathlib.Path(path)
    fix = "re-create it with `python -m leopard_jax.embed`"
    if not path.is_file():
        raise EmbeddingsFileError(
            f"{path}: not found; create it with `python -m leopard_jax.embed --out {path}`"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as e:  # zipfile / ValueError / OSError: all mean "not a readable npz"
        raise EmbeddingsFileError(f"{path}: not a readable .npz file ({e}); {fix}") from e
    missing = [f for f in ("embeddings", "keys") if f not in arrays]
    if missing:
        raise EmbeddingsFileError(
            f"{path}: lacks {', '.join(missing)}; it was not written by leopard_jax.embed: {fix}"
        )
    try:
        meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
        data = make(
            arrays["embeddings"], meta=meta, **{f: arrays[f] for f in STRING_FIELDS if f in arrays}
        )
    except ValueError as e:  # json.JSONDecodeError is one too
        raise EmbeddingsFileError(f"{path}: {e}; {fix}") from e
    problem = check(data)
    if problem:
        raise EmbeddingsFileError(f"{path}: {problem}; {fix}")
    return data


def is_same_record(a: Embeddings, i: np.ndarray, b: Embeddings, j: np.ndarray) -> np.ndarray:
    """Whether rows a[i] and b[j] are one record: same key and same crop file. The crop
    path (absolute) tells apart equal keys from two different datasets."""
    return (a.keys[i] == b.keys[j]) & (a.crops[i] == b.crops[j])
