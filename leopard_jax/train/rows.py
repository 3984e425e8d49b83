"""Which labelled rows of a dataset a run trains on and which it holds out for evaluation."""

from __future__ import annotations

import collections
import json
import pathlib
from collections.abc import Sequence

import ml_collections

from leopard_jax.data import split as split_lib
from leopard_jax.train import TrainingError

Row = dict[str, str]


def split_rows(
    rows: Sequence[Row], config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> tuple[list[Row], list[Row]]:
    """(train rows, held-out rows): the dataset's split.json, else a split by individual made
    here and kept in the workdir so a resumed run uses the same one. Only the flanks in
    config.flanks (all when empty) are used; training individuals need
    config.min_images_per_identity images, and two unless config.keep_singletons."""
    labelled = split_lib.filter_rows([r for r in rows if r["identity"]], flanks=config.flanks)
    if any(r["split"] for r in labelled):
        train = [r for r in labelled if r["split"] == "train"]
        test = [r for r in labelled if r["split"] == "test"]
    else:
        test_ids = set(_workdir_split(labelled, config, workdir)["test"])
        train = [r for r in labelled if r["identity"] not in test_ids]
        test = [r for r in labelled if r["identity"] in test_ids]
    if not config.keep_singletons:
        counts = collections.Counter(r["identity"] for r in train)
        train = [r for r in train if counts[r["identity"]] > 1]
    train = split_lib.filter_rows(train, min_images=config.min_images_per_identity)
    if not train:
        raise TrainingError(
            f"{config.data_dir}: no training individual with two or more images; "
            "add labelled photos"
        )
    if not test:
        raise TrainingError(
            f"{config.data_dir}: no held-out individuals; lower config.split.test_fraction "
            "or add individuals"
        )
    return train, test


def _workdir_split(
    labelled: Sequence[Row], config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> dict[str, list[str]]:
    """{"train": identities, "test": identities} from workdir/split.json, made on first use."""
    path = workdir / "split.json"
    if path.is_file():
        return json.loads(path.read_text())
    by_split = split_lib.split_identities(
        sorted({r["identity"] for r in labelled}),
        test_fraction=config.split.test_fraction,
        seed=config.split.seed,
    )
    path.write_text(json.dumps({k: sorted(v) for k, v in by_split.items()}, indent=2))
    return by_split
