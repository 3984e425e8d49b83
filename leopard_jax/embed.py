"""Embed every record of a dataset directory with an exported model -> `embeddings.npz`.

    python -m leopard_jax.embed --checkpoint WORKDIR_OR_MODEL_DIR --data DATASET_DIR \
        --out embeddings.npz [--batch-size 32] [--update] [--dtype float32|bfloat16]

The forward pass is jitted once for a fixed batch; the last batch is padded, so a dataset
of any size costs one compilation. `--update` embeds only records whose key is not yet in
the file and appends them, after checking that the file was made by the same weights
(a SHA-1 fingerprint of the variables) — mixing two models' embeddings in one file would
make every similarity between them meaningless.

Library use (trainer, demo): `embed_records(make_apply(model), variables, images)` for a
model in memory, `embed_dataset(checkpoint, dataset_dir)` for an exported one.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import importlib.metadata
import json
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from leopard_jax import embeddings_io, model_io
from leopard_jax.data import records

DTYPES = ("float32", "bfloat16")


class EmbedError(ValueError):
    """Inputs that do not fit together; the message names the files and the fix."""


# --------------------------------------------------------------------------- model


def build_model(description: dict[str, Any], dtype: str = "float32"):
    """The EmbeddingModel described by model.json, computing in `dtype`."""
    import jax.numpy as jnp

    from leopard_jax.models.embedding import EmbeddingModel

    kwargs = {k: v for k, v in description["model"].items() if k not in ("dtype", "drop_path_rate")}
    try:
        return EmbeddingModel(**kwargs, dtype=jnp.dtype(dtype))
    except TypeError as e:
        raise EmbedError(f"model.json describes {sorted(kwargs)}, which this leopard_jax cannot build ({e}); "
                         "upgrade leopard_jax or re-export the model") from e


@functools.lru_cache(maxsize=8)
def make_apply(model) -> Callable:
    """jit(variables, images [B,H,W,C] float32) -> [B, D] embeddings, cached per model so
    repeated calls (trainer evaluation each epoch) reuse one compilation."""
    import jax

    return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def fingerprint(variables: Any) -> str:
    """SHA-1 over every leaf's path, dtype, shape and bytes: identifies the weights, not
    the directory they sit in (a retrained model in the same dir gets a new one)."""
    import jax

    digest = hashlib.sha1()
    leaves, _ = jax.tree_util.tree_flatten_with_path(variables)
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        leaf = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def check_input(description: dict[str, Any], settings: dict[str, Any], model_dir, dataset_dir) -> None:
    """The dataset's records must have the size and channels the model was made for."""
    want = description.get("input", {})
    have_hw = (int(settings["height"]), int(settings["width"]))
    want_hw = (int(want.get("height", have_hw[0])), int(want.get("width", have_hw[1])))
    if have_hw != want_hw:
        raise EmbedError(
            f"{dataset_dir}: records are {have_hw[0]}x{have_hw[1]} (HxW) but the model in {model_dir} expects "
            f"{want_hw[0]}x{want_hw[1]}; re-run preprocess with --height {want_hw[0]} --width {want_hw[1]} "
            "into a new folder, or use a model made for this size")
    in_chans = description["model"].get("in_chans")
    if in_chans is not None and int(in_chans) != int(settings["channels"]):
        raise EmbedError(f"{dataset_dir}: records have {settings['channels']} channels but the model in {model_dir} "
                         f"takes {in_chans}; use a model made for {settings['channels']}-channel input")


# --------------------------------------------------------------------------- embedding


def embed_records(apply_fn: Callable, variables: Any, images: Sequence[np.ndarray], *, batch_size: int = 32,
                  progress: bool = False) -> np.ndarray:
    """uint8 H×W×4 images (e.g. a RecordSource) -> float32 [N, D] embeddings, in order.

    Fixed batch shape (the last batch zero-padded, its extra rows dropped) so `apply_fn`
    compiles once; the next batch is read and normalised while the device works on this one.
    """
    from leopard_jax.data.augment import normalize

    n = len(images)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    bar = Progress(n) if progress else None

    def host_batch(start: int) -> np.ndarray:
        batch = normalize(np.stack([images[i] for i in range(start, min(start + batch_size, n))]))
        if len(batch) < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]), batch.dtype)])
        return batch

    out, pending = [], None
    for start in range(0, n, batch_size):
        result = apply_fn(variables, host_batch(start))  # dispatched asynchronously
        if pending is not None:
            out.append(np.asarray(pending[1])[: pending[0]])
            if bar:
                bar.update(sum(len(o) for o in out))
        pending = (min(batch_size, n - start), result)
    out.append(np.asarray(pending[1])[: pending[0]])
    if bar:
        bar.update(n)
        bar.close()
    return np.concatenate(out).astype(np.float32)


def load_checkpoint(checkpoint: str | pathlib.Path) -> tuple[pathlib.Path, dict[str, Any], Any]:
    """(model dir, description, variables) for a model dir or a training workdir."""
    model_dir = model_io.resolve_model_dir(checkpoint).absolute()
    description, variables = model_io.load_model(model_dir)
    return model_dir, description, variables


def embed_dataset(checkpoint: str | pathlib.Path, dataset_dir: str | pathlib.Path, *, batch_size: int = 32,
                  dtype: str = "float32", rows: Sequence[dict[str, str]] | None = None,
                  progress: bool = False) -> np.ndarray:
    """float32 [N, D] embeddings of `rows` (default: all manifest rows) of a dataset with
    an exported model (model dir or training workdir)."""
    model_dir, description, variables = load_checkpoint(checkpoint)
    check_input(description, records.load_settings(dataset_dir), model_dir, dataset_dir)
    source = records.RecordSource(dataset_dir, rows)
    try:
        return embed_records(make_apply(build_model(description, dtype)), variables, source,
                             batch_size=batch_size, progress=progress)
    finally:
        source.close()


class Progress:
    """One-line progress bar on stderr with images/s (no tqdm dependency). The rate leaves
    out the first update, which carries the one-off compilation."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.start = time.perf_counter()
        self.first: tuple[int, float] | None = None

    def rate(self, done: int) -> float:
        now = time.perf_counter()
        if self.first is None or done <= self.first[0]:
            return done / max(now - self.start, 1e-9)
        return (done - self.first[0]) / max(now - self.first[1], 1e-9)

    def update(self, done: int) -> None:
        rate = self.rate(done)
        if self.first is None:
            self.first = (done, time.perf_counter())
        width = 30
        filled = int(width * done / max(self.total, 1))
        self.stream.write(f"\rembed [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {rate:.1f} img/s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


# --------------------------------------------------------------------------- the file


def version() -> str:
    try:
        return importlib.metadata.version("leopard_jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def make_meta(model_dir, description, weights_sha1: str, dtype: str, settings, dataset_dir) -> dict[str, Any]:
    return {
        "model": description,
        "checkpoint": str(model_dir),
        "checkpoint_step": description.get("info", {}).get("step"),
        "model_fingerprint": weights_sha1,
        "dtype": dtype,
        "preprocessing": settings,
        "dataset": str(pathlib.Path(dataset_dir).absolute()),
        "version": version(),
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def check_same_model(existing: embeddings_io.Embeddings, meta: dict[str, Any], out) -> None:
    """--update may only append embeddings made by the same weights at the same precision."""
    old = existing.meta
    if old.get("model_fingerprint") != meta["model_fingerprint"]:
        raise EmbedError(
            f"{out}: made by a different model ({old.get('checkpoint', 'unknown checkpoint')}, weights "
            f"{str(old.get('model_fingerprint'))[:10]}) than {meta['checkpoint']} (weights "
            f"{meta['model_fingerprint'][:10]}); write to a new --out, or drop --update to re-embed everything")
    if old.get("dtype", "float32") != meta["dtype"]:
        raise EmbedError(f"{out}: was embedded with --dtype {old.get('dtype')}; pass --dtype {old.get('dtype')} "
                         "to append to it, or drop --update to re-embed everything")


def rows_to_columns(rows: Sequence[dict[str, str]], dataset_dir) -> dict[str, list[str]]:
    root = pathlib.Path(dataset_dir).absolute()
    return {
        "keys": [r["key"] for r in rows],
        "paths": [r["source"] for r in rows],
        "identities": [r["identity"] for r in rows],
        "flanks": [r["flank"] for r in rows],
        "crops": [str(root / r["crop"]) if r.get("crop") else "" for r in rows],
        "edges": [str(root / r["edge"]) if r.get("edge") else "" for r in rows],
    }


def run(checkpoint, dataset_dir, out, *, batch_size: int = 32, update: bool = False, dtype: str = "float32",
        progress: bool = True, log=print) -> embeddings_io.Embeddings:
    """The command: embed the dataset (or, with `update`, its new records) into `out`."""
    if batch_size < 1:
        raise EmbedError(f"--batch-size must be at least 1, got {batch_size}")
    if dtype not in DTYPES:
        raise EmbedError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    settings = records.load_settings(dataset_dir)
    rows = records.read_manifest(dataset_dir)
    if not rows:
        raise EmbedError(f"{dataset_dir}: no records (no committed shards in {dataset_dir}/shards); "
                         "run `python -m leopard_jax.preprocess` into it first")
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        raise EmbedError(f"{dataset_dir}: duplicate record keys; re-run preprocess into a new folder")
    model_dir = model_io.resolve_model_dir(checkpoint).absolute()
    description = json.loads((model_dir / model_io.MODEL_FILE).read_text())
    check_input(description, settings, model_dir, dataset_dir)  # before the (slow) weight load

    existing = None
    if update and pathlib.Path(out).exists():
        existing = embeddings_io.read(out)
    _, _, variables = load_checkpoint(model_dir)
    meta = make_meta(model_dir, description, fingerprint(variables), dtype, settings, dataset_dir)
    if existing is not None:
        check_same_model(existing, meta, out)
        known = set(existing.keys.tolist())
        rows = [r for r in rows if r["key"] not in known]
        if not rows:
            log(f"nothing new in {dataset_dir}: all {len(keys)} records are already in {out}; left unchanged")
            return existing

    source = records.RecordSource(dataset_dir, rows)
    try:
        vectors = embed_records(make_apply(build_model(description, dtype)), variables, source,
                                batch_size=batch_size, progress=progress)
    finally:
        source.close()
    new = embeddings_io.make(vectors, meta=meta, **rows_to_columns(rows, dataset_dir))
    if existing is not None:
        meta["datasets"] = sorted(set(existing.meta.get("datasets", [existing.meta.get("dataset")])) | {meta["dataset"]})
        new = embeddings_io.concat(existing, new, meta=meta)
    embeddings_io.write(out, new)
    kept = len(existing) if existing is not None else 0
    log(f"embedded {len(rows)} new records ({kept} kept) -> {out} [{len(new)} x {new.dims}]")
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leopard_jax.embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="training workdir (its best_model/) or model dir (e.g. from leopard_jax.models.convert)")
    parser.add_argument("--data", required=True, help="dataset dir written by leopard_jax.preprocess")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--update", action="store_true",
                        help="embed only records whose key is not in --out yet, and append them")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute precision (default float32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        run(args.checkpoint, args.data, args.out, batch_size=args.batch_size, update=args.update,
            dtype=args.dtype, progress=not args.no_progress)
    except (EmbedError, embeddings_io.EmbeddingsFileError, records.DatasetError, model_io.ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
