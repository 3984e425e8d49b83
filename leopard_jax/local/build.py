"""Fill a dataset's feature store: every record not yet in it, in parallel, resumable."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

from leopard_jax.data import records
from leopard_jax.local import features, store

PART_SIZE = 64


def _extract_part(args) -> int:
    dataset_dir, name, rows, settings, max_keypoints, long_side, equalize = args
    import cv2

    cv2.setNumThreads(1)  # one process per core already
    found = [
        store.extract_record(dataset_dir, row, settings, max_keypoints, long_side, equalize)
        for row in rows
    ]
    store.write_part(
        store.store_dir(dataset_dir),
        name,
        [row["key"] for row in rows],
        [xy for xy, _ in found],
        [desc for _, desc in found],
    )
    return len(rows)


def build(
    dataset_dir,
    *,
    max_keypoints: int = features.MAX_KEYPOINTS,
    long_side: int = features.LONG_SIDE,
    equalize: bool = True,
    workers: int = 0,
    progress: bool = True,
) -> tuple[int, int]:
    """(records extracted now, records in the store). workers 0: one per core."""
    from tqdm import tqdm

    settings = records.load_settings(dataset_dir)
    rows = records.read_manifest(dataset_dir)
    store.write_settings(
        dataset_dir,
        {
            "max_keypoints": int(max_keypoints),
            "long_side": int(long_side),
            "equalize": bool(equalize),
            "version": 2,
        },
    )
    todo = store.missing_rows(dataset_dir, rows)
    start = len(store.part_names(dataset_dir))
    jobs = [
        (
            str(dataset_dir),
            f"part-{os.getpid()}-{start + i:05d}",
            todo[j : j + PART_SIZE],
            settings,
            max_keypoints,
            long_side,
            equalize,
        )
        for i, j in enumerate(range(0, len(todo), PART_SIZE))
    ]
    workers = workers or os.cpu_count() or 1
    with tqdm(total=len(todo), desc="local features", unit="img", disable=not progress) as bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                bar.update(_extract_part(job))
        else:
            with ProcessPoolExecutor(workers) as pool:
                for done in pool.map(_extract_part, jobs):
                    bar.update(done)
    return len(todo), len(rows)
