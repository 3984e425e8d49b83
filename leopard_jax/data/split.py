"""Which records train and which are held out, and which are used at all.

Open set (the default): no individual's photos on both sides. An individual is an identity
with its flank suffix removed (`BGL09_right` and `BGL09_left` are one leopard), so both
flanks of an animal land on the same side: a held-out individual is then truly unseen, even
though its two flanks carry different coats. Closed set (`--closed-set`, as LeopardID2022
papers also report): every identity keeps some photos in training and some held out.
A dataset whose input carried its own split (COCO / CSV `split` field) already has one;
this command then replaces it only with `--overwrite`.

    python -m leopard_jax.data.split --data DATASET_DIR --test-fraction 0.2 --seed 0 [--closed-set]
"""

from __future__ import annotations

import collections
import pathlib
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from absl import flags

from leopard_jax import cli
from leopard_jax.data import records

_FLANK_SUFFIX = re.compile(r"[_\- ](left|right)$", re.IGNORECASE)

Row = Mapping[str, str]


def individual(identity: str) -> str:
    """The animal an identity belongs to: the identity without a _left/_right suffix."""
    return _FLANK_SUFFIX.sub("", identity)


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def split_identities(
    identities: Iterable[str], *, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """{"train": [...], "test": [...]} (sorted identities), drawn by individual.

    round(test_fraction × individuals) individuals go to test, at least one and at least one
    left for training when there are two or more.
    """
    _check_fraction(test_fraction)
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


def split_records(rows: Iterable[Row], *, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Closed set: {"train": keys, "test": keys} with every identity on both sides.

    Each identity with n >= 2 records sends round(test_fraction × n) of them (at least one,
    leaving at least one) to test; an identity with one record trains. Unlabelled rows are
    in neither.
    """
    _check_fraction(test_fraction)
    keys = collections.defaultdict(list)
    for row in rows:
        if row["identity"]:
            keys[row["identity"]].append(row["key"])
    if not keys:
        raise ValueError("no labelled records to split")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for identity in sorted(keys):
        mine = sorted(keys[identity])
        n_test = min(max(int(round(test_fraction * len(mine))), 1), len(mine) - 1)
        chosen = set(rng.permutation(len(mine))[:n_test].tolist())
        for k, key in enumerate(mine):
            (test if k in chosen else train).append(key)
    return {"train": sorted(train), "test": sorted(test)}


def filter_rows(
    rows: Sequence[Row], *, flanks: str | Iterable[str] = (), min_images: int = 0
) -> list[Row]:
    """The rows training may use: flank in `flanks` (when given; "left,right" or a list,
    any case), then identities with at least `min_images` of the rows left. Rows without
    an identity pass the count unchanged (they have no class to count)."""
    if isinstance(flanks, str):
        flanks = flanks.split(",")
    wanted = {f.strip().lower() for f in flanks if f.strip()}
    kept = [r for r in rows if not wanted or r["flank"].lower() in wanted]
    if min_images > 1:
        counts = collections.Counter(r["identity"] for r in kept if r["identity"])
        kept = [r for r in kept if not r["identity"] or counts[r["identity"]] >= min_images]
    return kept


# --------------------------------------------------------------------------- the command

FLAGS = flags.FlagValues()
_DATA = flags.DEFINE_string(
    "data",
    None,
    "dataset directory written by leopard_jax.preprocess",
    flag_values=FLAGS,
    required=True,
)
_TEST_FRACTION = flags.DEFINE_float(
    "test-fraction",
    0.2,
    "share of individuals (closed set: of each identity's records) held out",
    flag_values=FLAGS,
)
_SEED = flags.DEFINE_integer("seed", 0, "seed of the draw", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite",
    False,
    "replace an existing split.json (or the input's own split)",
    flag_values=FLAGS,
)
_CLOSED_SET = flags.DEFINE_boolean(
    "closed-set",
    False,
    "split each identity's records instead of the individuals",
    flag_values=FLAGS,
)


def run(argv: list[str]) -> None:
    if argv:
        raise cli.CommandError(f"unexpected arguments {argv}; see --help")
    data, fraction = _DATA.value, _TEST_FRACTION.value
    if not 0.0 < fraction < 1.0:
        raise cli.CommandError(f"--test-fraction must be in (0, 1), got {fraction}")
    records.load_settings(data)
    path = pathlib.Path(data) / records.SPLIT_FILE
    if path.exists() and not _OVERWRITE.value:
        raise cli.CommandError(
            f"{path} exists (models trained on it rely on it); pass --overwrite to replace it"
        )
    rows = [r for r in records.read_manifest(data) if r["identity"]]
    if not rows:
        raise cli.CommandError(
            f"{data}: no labelled records; preprocess identity folders or a CSV with identities"
        )
    if any(r["split"] for r in rows) and not _OVERWRITE.value:
        raise cli.CommandError(
            f"{data}: its records carry the input's own split; pass --overwrite to replace it"
        )
    if _CLOSED_SET.value:
        by_split = split_records(rows, test_fraction=fraction, seed=_SEED.value)
        records.save_split(data, by_split, by_record=True)
        print(
            f"{path}: {len(by_split['train'])} train / {len(by_split['test'])} test records "
            f"(closed set: {len({r['identity'] for r in rows})} identities on both sides)"
        )
        return
    by_split = split_identities(
        {r["identity"] for r in rows}, test_fraction=fraction, seed=_SEED.value
    )
    records.save_split(data, by_split)
    print(
        f"{path}: {len(by_split['train'])} train / {len(by_split['test'])} test identities "
        f"({len({individual(i) for i in by_split['test']})} held-out individuals)"
    )


def main(argv: list[str] | None = None) -> int:
    return cli.run(
        FLAGS, run, argv, errors=(records.DatasetError,), prog="python -m leopard_jax.data.split"
    )


if __name__ == "__main__":
    sys.exit(main())
