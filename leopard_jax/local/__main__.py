"""Build a dataset's local-feature store (SIFT + RootSIFT per crop); rerun to resume.

python -m leopard_jax.local --data DATASET_DIR [--max-keypoints 500] [--long-side 512]
    [--noequalize] [--workers 0]
"""

from __future__ import annotations

import sys

from absl import flags

from leopard_jax import cli
from leopard_jax.data import records
from leopard_jax.local import build, features, store

FLAGS = flags.FlagValues()
_DATA = flags.DEFINE_string(
    "data", None, "dataset dir written by leopard_jax.preprocess", flag_values=FLAGS, required=True
)
_MAX_KEYPOINTS = flags.DEFINE_integer(
    "max-keypoints",
    features.MAX_KEYPOINTS,
    "strongest keypoints kept per crop",
    lower_bound=1,
    flag_values=FLAGS,
)
_LONG_SIDE = flags.DEFINE_integer(
    "long-side",
    features.LONG_SIDE,
    "crops are resized to this longer side first (0: as is)",
    lower_bound=0,
    flag_values=FLAGS,
)
_EQUALIZE = flags.DEFINE_boolean(
    "equalize",
    True,
    "equalise the animal's grey levels before SIFT (restores washed-out flash photos)",
    flag_values=FLAGS,
)
_WORKERS = flags.DEFINE_integer(
    "workers", 0, "worker processes (0: one per core)", lower_bound=0, flag_values=FLAGS
)
_NO_PROGRESS = flags.DEFINE_boolean("no-progress", False, "no progress bar", flag_values=FLAGS)


def run(argv: list[str]) -> int:
    if argv:
        raise cli.CommandError(f"unexpected arguments {argv}; see --help")
    done, total = build.build(
        _DATA.value,
        max_keypoints=_MAX_KEYPOINTS.value,
        long_side=_LONG_SIDE.value,
        equalize=_EQUALIZE.value,
        workers=_WORKERS.value,
        progress=not _NO_PROGRESS.value,
    )
    print(f"{done} crops extracted now; {total} in {store.store_dir(_DATA.value)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(
        FLAGS,
        run,
        argv,
        errors=(store.StoreError, records.DatasetError),
        prog="python -m leopard_jax.local",
        doc=__doc__,
    )


if __name__ == "__main__":
    sys.exit(main())
