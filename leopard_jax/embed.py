"""Embed every record of a dataset directory with an exported model -> `embeddings.npz`.

    python -m leopard_jax.embed --checkpoint WORKDIR_OR_MODEL_DIR_OR_ONNX --data DATASET_DIR \\
        --out embeddings.npz [--batch-size 32] [--update] [--dtype float32|bfloat16] \\
        [--backend jax|onnx|auto]

The images go through one embed path per backend: `jax` is `inference.embed_images`
(jitted, sharded over the local devices, compiled once for a dataset of any size); `onnx` is
`inference.embed_images_onnx` on ONNX Runtime, with a file from `leopard_jax.export` or a
model dir exported in memory (ONNX Runtime's CPU convolutions are faster than XLA's); `auto`
takes ONNX Runtime when JAX runs on the CPU at float32, JAX otherwise. The two agree within
1e-4, and the file's meta records which one ran. `--update` embeds only records
whose key is not yet in the file and appends them, after checking that the file was made by
the same weights (a SHA-1 fingerprint of the variables): mixing two models' embeddings in
one file would make every similarity between them meaningless.

Library use: `embed_dataset(checkpoint, dataset_dir)` for an exported model; a model in
memory goes straight to `inference.embed_images`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import flags

from leopard_jax import cli, embeddings_io, export, inference, model_io, models, parallel
from leopard_jax.data import records

DTYPES = tuple(models.DTYPES)  # the model package owns the precision names
BACKENDS = ("jax", "onnx", "auto")

FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "training workdir (its best_model/), model dir (e.g. from leopard_jax.models.convert) "
    "or, for --backend onnx, a .onnx file from leopard_jax.export",
    flag_values=FLAGS,
    required=True,
)
_DATA = flags.DEFINE_string(
    "data", None, "dataset dir written by leopard_jax.preprocess", flag_values=FLAGS, required=True
)
_OUT = flags.DEFINE_string("out", None, "output .npz", flag_values=FLAGS, required=True)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch-size", 32, "images per forward pass", lower_bound=1, flag_values=FLAGS
)
_UPDATE = flags.DEFINE_boolean(
    "update",
    False,
    "embed only records whose key is not in --out yet, and append them",
    flag_values=FLAGS,
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", DTYPES, "compute precision", flag_values=FLAGS)
_BACKEND = flags.DEFINE_enum(
    "backend",
    "jax",
    BACKENDS,
    "jax: XLA on the local devices; onnx: ONNX Runtime on the CPU, float32 (a model dir is "
    "exported in memory first); auto: onnx when JAX runs on the CPU and --dtype is float32",
    flag_values=FLAGS,
)
_NO_PROGRESS = flags.DEFINE_boolean("no-progress", False, "no progress bar", flag_values=FLAGS)


class EmbedError(ValueError):
    """Inputs that do not fit together; the message names the files and the fix."""


# --------------------------------------------------------------------------- inputs


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


def check_input(
    description: dict[str, Any], settings: dict[str, Any], model_dir, dataset_dir
) -> None:
    """The dataset's records must have the size and channels the model was made for."""
    want = description.get("input", {})
    have_hw = (int(settings["height"]), int(settings["width"]))
    want_hw = (int(want.get("height", have_hw[0])), int(want.get("width", have_hw[1])))
    if have_hw != want_hw:
        raise EmbedError(
            f"{dataset_dir}: records are {have_hw[0]}x{have_hw[1]} (HxW) but the model in "
            f"{model_dir} expects {want_hw[0]}x{want_hw[1]}; re-run "
            "`python -m leopard_jax.preprocess` "
            f"with --config.render.height={want_hw[0]} --config.render.width={want_hw[1]} "
            "into a new folder, or use a model made for this size"
        )
    in_chans = description["model"].get("in_chans")
    if in_chans is not None and int(in_chans) != int(settings["channels"]):
        raise EmbedError(
            f"{dataset_dir}: records have {settings['channels']} channels but the model in "
            f"{model_dir} takes {in_chans}; use a model made for "
            f"{settings['channels']}-channel input"
        )


def is_onnx_file(checkpoint) -> bool:
    return pathlib.Path(checkpoint).suffix.lower() == ".onnx"


def choose_backend(backend: str, dtype: str, checkpoint) -> str:
    """`jax` or `onnx` for --backend (`auto`: ONNX Runtime on the CPU at float32)."""
    import jax

    if backend not in BACKENDS:
        raise EmbedError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        cpu = jax.default_backend() == "cpu"
        backend = "onnx" if is_onnx_file(checkpoint) or (cpu and dtype == "float32") else "jax"
    if backend == "onnx" and dtype != "float32":
        raise EmbedError(
            f"--backend onnx computes in float32, not --dtype {dtype}; drop --dtype or pass "
            "--backend jax"
        )
    if backend == "jax" and is_onnx_file(checkpoint):
        raise EmbedError(
            f"--checkpoint {checkpoint}: an ONNX file runs on ONNX Runtime; pass --backend onnx, "
            "or the model dir it was exported from for --backend jax"
        )
    return backend


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A model ready to embed: what the file's meta records, and the backend's embed path
    `embed(images, *, batch_size, progress) -> float32 [N, D]`."""

    backend: str
    path: pathlib.Path  # model dir or .onnx file
    description: dict[str, Any]
    weights_sha1: str
    embed: Callable[..., np.ndarray]


def onnx_description(session, meta: dict[str, str], path) -> dict[str, Any]:
    """model.json as the ONNX file records it, its input taken from the graph itself."""
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise EmbedError(
            f"{path}: input shape {shape} is not [batch, H, W, C] with a fixed size; "
            "export the model with `python -m leopard_jax.export`"
        )
    _, height, width, channels = shape
    description = export.description_of(meta)
    description["input"] = {"height": height, "width": width, "channels": channels}
    description["model"] = {**description["model"], "in_chans": channels}
    return description


def load(checkpoint, backend: str, dtype: str, settings, dataset_dir) -> Loaded:
    """The model of `checkpoint` on `backend` (`jax` or `onnx`), after checking that it
    takes the dataset's records (before the slow part: weights, export)."""
    if is_onnx_file(checkpoint):
        path = pathlib.Path(checkpoint).absolute()
        session, meta = export.load(path)
        description = onnx_description(session, meta, path)
        check_input(description, settings, path, dataset_dir)
        return Loaded(
            "onnx",
            path,
            description,
            meta[export.META_PREFIX + "model_fingerprint"],
            functools.partial(inference.embed_images_onnx, session),
        )
    path = model_io.resolve_model_dir(checkpoint).absolute()
    description = model_io.read_description(path)
    check_input(description, settings, path, dataset_dir)
    _, variables = model_io.load_model(path)
    weights_sha1 = fingerprint(variables)
    if backend == "onnx":

        def embed_onnx(images, **kw):  # exported on first use: --update may need none
            session, _ = export.load(export.export_model(description, variables, weights_sha1))
            return inference.embed_images_onnx(session, images, **kw)

        return Loaded("onnx", path, description, weights_sha1, embed_onnx)

    # Sent to the devices once; the host copy goes with this frame (on a CPU the two were
    # two copies of most of the weights in one process: ~36 of B2's 45 MB).
    on_devices = parallel.replicate(variables)

    def embed_jax(images, **kw):
        model = model_io.build_model(description, dtype)
        return inference.embed_images(model, on_devices, images, replicated=True, **kw)

    return Loaded("jax", path, description, weights_sha1, embed_jax)


def embed_rows(loaded: Loaded, dataset_dir, rows, *, batch_size: int, progress: bool) -> np.ndarray:
    """float32 [N, D] embeddings of `rows` (None: every manifest row) of a dataset."""
    source = records.RecordSource(dataset_dir, rows)
    try:
        return loaded.embed(source, batch_size=batch_size, progress=progress)
    finally:
        source.close()


def embed_dataset(
    checkpoint: str | pathlib.Path,
    dataset_dir: str | pathlib.Path,
    *,
    batch_size: int = 32,
    dtype: str = "float32",
    backend: str = "jax",
    rows: Sequence[dict[str, str]] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """float32 [N, D] embeddings of `rows` (default: all manifest rows) of a dataset with
    an exported model (model dir, training workdir or, for `backend="onnx"`, .onnx file)."""
    backend = choose_backend(backend, dtype, checkpoint)
    loaded = load(checkpoint, backend, dtype, records.load_settings(dataset_dir), dataset_dir)
    return embed_rows(loaded, dataset_dir, rows, batch_size=batch_size, progress=progress)


# --------------------------------------------------------------------------- the file


def version() -> str:
    try:
        return importlib.metadata.version("leopard_jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def make_meta(loaded: Loaded, dtype: str, settings, dataset_dir) -> dict[str, Any]:
    description = loaded.description
    return {
        "model": description,
        "checkpoint": str(loaded.path),
        "checkpoint_step": description.get("info", {}).get("step"),
        "model_fingerprint": loaded.weights_sha1,
        "dtype": dtype,
        "backend": loaded.backend,
        "preprocessing": settings,
        "dataset": str(pathlib.Path(dataset_dir).absolute()),
        "version": version(),
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def check_same_model(existing: embeddings_io.Embeddings, meta: dict[str, Any], out) -> None:
    """--update may only append embeddings made by the same weights at the same precision."""
    old = existing.meta
    if old.get("model_fingerprint") != meta["model_fingerprint"]:
        raise EmbedError(
            f"{out}: made by a different model ({old.get('checkpoint', 'unknown checkpoint')}, "
            f"weights {str(old.get('model_fingerprint'))[:10]}) than {meta['checkpoint']} "
            f"(weights {meta['model_fingerprint'][:10]}); write to a new --out, or drop --update "
            "to re-embed everything"
        )
    if old.get("dtype", "float32") != meta["dtype"]:
        raise EmbedError(
            f"{out}: was embedded with --dtype {old.get('dtype')}; pass --dtype {old.get('dtype')} "
            "to append to it, or drop --update to re-embed everything"
        )


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


# --------------------------------------------------------------------------- the command


def run(
    checkpoint,
    dataset_dir,
    out,
    *,
    batch_size: int = 32,
    update: bool = False,
    dtype: str = "float32",
    backend: str = "jax",
    progress: bool = True,
    log=print,
) -> embeddings_io.Embeddings:
    """The command: embed the dataset (or, with `update`, its new records) into `out`."""
    if batch_size < 1:
        raise EmbedError(f"--batch-size must be at least 1, got {batch_size}")
    if dtype not in DTYPES:
        raise EmbedError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    settings = records.load_settings(dataset_dir)
    rows = records.read_manifest(dataset_dir)
    if not rows:
        raise EmbedError(
            f"{dataset_dir}: no records (no committed shards in {dataset_dir}/shards); "
            "run `python -m leopard_jax.preprocess` into it first"
        )
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        raise EmbedError(
            f"{dataset_dir}: duplicate record keys; re-run preprocess into a new folder"
        )
    backend = choose_backend(backend, dtype, checkpoint)
    existing = None
    if update and pathlib.Path(out).exists():
        existing = embeddings_io.read(out)
    loaded = load(checkpoint, backend, dtype, settings, dataset_dir)
    meta = make_meta(loaded, dtype, settings, dataset_dir)
    if existing is not None:
        check_same_model(existing, meta, out)
        known = set(existing.keys.tolist())
        rows = [r for r in rows if r["key"] not in known]
        if not rows:
            log(
                f"nothing new in {dataset_dir}: all {len(keys)} records are already in {out}; "
                "left unchanged"
            )
            return existing

    vectors = embed_rows(loaded, dataset_dir, rows, batch_size=batch_size, progress=progress)
    new = embeddings_io.make(vectors, meta=meta, **rows_to_columns(rows, dataset_dir))
    if existing is not None:
        datasets = set(existing.meta.get("datasets", [existing.meta.get("dataset")]))
        meta["datasets"] = sorted(datasets | {meta["dataset"]})
        new = embeddings_io.concat(existing, new, meta=meta)
    embeddings_io.write(out, new)
    kept = len(existing) if existing is not None else 0
    log(f"embedded {len(rows)} new records ({kept} kept) -> {out} [{len(new)} x {new.dims}]")
    return new


def command(argv: list[str]) -> None:
    if argv:
        raise cli.CommandError(f"unexpected arguments {argv}; every setting is a flag, see --help")
    run(
        _CHECKPOINT.value,
        _DATA.value,
        _OUT.value,
        batch_size=_BATCH_SIZE.value,
        update=_UPDATE.value,
        dtype=_DTYPE.value,
        backend=_BACKEND.value,
        progress=not _NO_PROGRESS.value,
    )


def main(argv: list[str] | None = None) -> int:
    errors = (
        EmbedError,
        embeddings_io.EmbeddingsFileError,
        records.DatasetError,
        model_io.ModelDirError,
        export.ExportError,
    )
    return cli.run(FLAGS, command, argv, errors=errors, prog="python -m leopard_jax.embed")


if __name__ == "__main__":
    sys.exit(main())
