"""Train/test split by individual: no individual's photos on both sides.

An individual is an identity with its flank suffix removed (`BGL09_right` and `BGL09_left`
are one leopard), so both flanks of an animal land on the same side: a held-out
individual is then truly unseen, even though its two flanks carry different coats.

    python -m leopard_jax.data.split --data DATASET_DIR --test-fraction 0.2 --seed 0
"""

from __future__ import annotations

import argparse
import pathlib
import re
from collections.abc import Iterable

import numpy as np

from leopard_jax.data import records

_FLANK_SUFFIX = re.compile(r"[_\- ](left|right)$", re.IGNORECASE)


def individual(identity: str) -> str:
    """The animal an identity belongs to: the identity without a _left/_right suffix."""
    return _FLANK_SUFFIX.sub("", identity)


def split_identities(identities: Iterable[str], *, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """{"train": [...], "test": [...]} (sorted identities), drawn by individual.

    round(test_fraction × individuals) individuals go to test, at least one and at least one
    left for training when there are two or more.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    identities = sorted({i for i in identities if i})
    animals = sorted({individual(i) for i in identities})
    if not animals:
        raise ValueError("no labelled identities to split")
    n_test = int(round(test_fraction * len(animals)))
    n_test = min(max(n_test, 1), max(len(animals) - 1, 1))
    chosen = np.random.default_rng(seed).permutation(len(animals))[:n_test]
    test_animals = {animals[k] for k in chosen}
    test = [i for i in identities if individual(i) in test_animals]
    return {"train": [i for i in identities if individual(i) not in test_animals], "test": test}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m leopard_jax.data.split",
                                     description="Write DATASET_DIR/split.json: train/test by individual.")
    parser.add_argument("--data", required=True, help="dataset directory written by leopard_jax.preprocess")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of individuals held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing split.json")
    args = parser.parse_args(argv)
    if not 0.0 < args.test_fraction < 1.0:
        parser.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    try:
        records.load_settings(args.data)
    except records.DatasetError as e:
        parser.exit(2, f"error: {e}\n")
    path = pathlib.Path(args.data) / records.SPLIT_FILE
    if path.exists() and not args.overwrite:
        parser.exit(2, f"error: {path} exists (models trained on it rely on it); pass --overwrite to replace it\n")
    identities = {row["identity"] for row in records.read_manifest(args.data)}
    identities.discard("")
    if not identities:
        parser.exit(2, f"error: {args.data}: no labelled records; preprocess identity folders or a CSV with identities\n")
    by_split = split_identities(identities, test_fraction=args.test_fraction, seed=args.seed)
    records.save_split(args.data, by_split)
    print(f"{path}: {len(by_split['train'])} train / {len(by_split['test'])} test identities "
          f"({len({individual(i) for i in by_split['test']})} held-out individuals)")


if __name__ == "__main__":
    main()
