"""A self-contained exported model: what `embed` reads, `train` and `models.convert` write.

    MODEL_DIR/model.json   {"model": {backbone, head, dims, in_chans, ...},
                            "input": {height, width, ...}, "info": {...}}
    MODEL_DIR/variables/   orbax checkpoint of {"params": ..., "batch_stats": ...}

Why a separate format from training checkpoints: embedding needs the weights and the model
description only, not optimiser state or the class centres, and an imported spotID model
has no training run behind it. A training workdir exports its best model here
(`WORKDIR/best_model`), so `embed --checkpoint` accepts a workdir or a model dir alike.

This module is the only reader and writer of that directory: `save_model` (train, convert),
`read_description` / `load_model` and `build_model` (embed).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"
WORKDIR_BEST = "best_model"


class ModelDirError(ValueError):
    """A path that holds no exported model; the message names it and the fix."""


def _local_checkpointer():
    """An orbax checkpointer of this process alone: an exported model is written by one
    process of a multi-host run (and read by any), so no cross-process barrier."""
    import jax
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}
        )
    )


def save_model(
    model_dir: str | os.PathLike, variables: dict[str, Any], description: dict[str, Any]
) -> None:
    """Write variables + description; replaces an existing export atomically enough that a
    crash leaves either the old or the new model (written aside, then renamed)."""
    import jax
    import numpy as np

    model_dir = pathlib.Path(model_dir).absolute()
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    host_vars = jax.tree.map(lambda x: np.asarray(x), dict(variables))
    with _local_checkpointer() as ckptr:
        ckptr.save(tmp / VARIABLES_DIR, host_vars)
    (tmp / MODEL_FILE).write_text(json.dumps(description, indent=2, sort_keys=True, default=str))
    old = model_dir.with_name(model_dir.name + ".old")
    if model_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(model_dir, old)
    os.replace(tmp, model_dir)
    if old.exists():
        shutil.rmtree(old)


def resolve_model_dir(path: str | os.PathLike) -> pathlib.Path:
    """A model dir itself, or a training workdir holding `best_model/`."""
    path = pathlib.Path(path)
    for candidate in (path, path / WORKDIR_BEST):
        if (candidate / MODEL_FILE).is_file():
            return candidate
    raise ModelDirError(
        f"{path}: no {MODEL_FILE} here or in {path / WORKDIR_BEST}; pass a training workdir "
        "or a directory written by `python -m leopard_jax.models.convert`"
    )


def read_description(path: str | os.PathLike) -> dict[str, Any]:
    """model.json alone: cheap, so inputs can be checked before the (slow) weight load."""
    return json.loads((resolve_model_dir(path) / MODEL_FILE).read_text())


def load_model(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(description, variables) with numpy leaves."""
    model_dir = resolve_model_dir(path).absolute()
    description = read_description(model_dir)
    with _local_checkpointer() as ckptr:
        variables = ckptr.restore(model_dir / VARIABLES_DIR)
    return description, variables


def build_model(description: dict[str, Any], dtype: str = "float32"):
    """The EmbeddingModel that model.json describes, for inference in `dtype`."""
    import jax.numpy as jnp

    from leopard_jax.models.embedding import EmbeddingModel

    kwargs = {k: v for k, v in description["model"].items() if k not in ("dtype", "drop_path_rate")}
    try:
        return EmbeddingModel(**kwargs, dtype=jnp.dtype(dtype))
    except TypeError as e:
        raise ModelDirError(
            f"model.json describes {sorted(kwargs)}, which this leopard_jax cannot build ({e}); "
            "upgrade leopard_jax or re-export the model"
        ) from e
