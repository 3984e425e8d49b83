"""Export the reviewed individuals: one folder per connected component, plus a CSV.

Singletons (images linked to nothing) are exported as individuals of their own by default:
then the CSV is a complete partition of the images and can be handed back to `preprocess`
as a labelled `path,identity[,flank]` list (its first three columns). `reviewed` tells
confirmed singletons (looked at as an anchor) from images nobody has looked at yet.

The export is written to a temporary sibling folder and renamed at the end, so an
interrupted export never leaves a half-filled OUT that looks complete.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import pathlib
import re
import shutil
import sys

from leopard_jax.review import store as store_lib

CSV_NAME = "individuals.csv"
CONFLICTS_NAME = "conflicts.csv"
CSV_FIELDS = ("path", "identity", "flank", "key", "file", "label", "reviewed")


class ExportError(ValueError):
    """An export that cannot run; the message names the path and the fix."""


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    out: pathlib.Path
    individuals: int
    images: int
    copied: int
    missing: tuple[str, ...]  # keys whose image file could not be read
    conflicts: tuple[tuple[str, str], ...]


def group_individuals(
    rows: list[store_lib.ImageRow], graph: store_lib.MatchGraph, singletons: bool = True
) -> list[list[store_lib.ImageRow]]:
    """Rows grouped by component, groups ordered by their first row's position."""
    groups: dict[str, list[store_lib.ImageRow]] = collections.defaultdict(list)
    for row in sorted(rows, key=lambda r: (r.position, r.key)):
        groups[graph.component(row.key)].append(row)
    return [g for g in groups.values() if singletons or len(g) > 1]


def _file_name(key: str, source: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "image"
    suffix = pathlib.Path(source).suffix.lower() or ".jpg"
    name, n = stem + suffix, 1
    while name in taken:  # two keys that sanitise alike
        n += 1
        name = f"{stem}_{n}{suffix}"
    taken.add(name)
    return name


def export_individuals(
    store: store_lib.Store,
    out: str | pathlib.Path,
    rows: list[store_lib.ImageRow] | None = None,
    image: str = "photo",
    singletons: bool = True,
) -> ExportSummary:
    """Copies each individual's images (`photo` = source photo, `crop`) into OUT/<individual>/."""
    out = pathlib.Path(out)
    if image not in ("photo", "crop"):
        raise ExportError(f"image kind {image!r} unknown; use 'photo' or 'crop'")
    rows = store.images() if rows is None else rows
    if not rows:
        raise ExportError(
            f"store {store.path} lists no images (the page was never opened on it); "
            "pass --embeddings embeddings.npz"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(
            f"export folder {out} already exists and is not empty; choose a new --out or remove it"
        )
    if not out.parent.is_dir():
        raise ExportError(
            f"export folder {out}: parent {out.parent} does not exist; create it first"
        )
    graph = store_lib.build_graph(store.decisions())
    groups = group_individuals(rows, graph, singletons)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    missing, copied = [], 0
    with open(partial / CSV_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for number, group in enumerate(groups, start=1):
            name = f"individual_{number:04d}"
            folder = partial / name
            folder.mkdir()
            taken: set[str] = set()
            for row in group:
                source = (row.path or row.crop) if image == "photo" else (row.crop or row.path)
                file_name = ""
                try:
                    file_name = _file_name(row.key, source, taken)
                    shutil.copy2(source, folder / file_name)
                    copied += 1
                except OSError:
                    missing.append(row.key)
                    file_name = ""
                writer.writerow(
                    {
                        "path": row.path,
                        "identity": name,
                        "flank": row.flank,
                        "key": row.key,
                        "file": f"{name}/{file_name}" if file_name else "",
                        "label": row.identity,
                        "reviewed": int(row.key in graph.reviewed),
                    }
                )
    found = store_lib.conflicts(graph)
    if found:
        with open(partial / CONFLICTS_NAME, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("key_a", "key_b"))
            writer.writerows(found)
    if out.exists():
        out.rmdir()
    partial.rename(out)
    if missing:
        print(
            f"export: {len(missing)} image file(s) could not be read and were listed without "
            f"a file (first: {missing[0]})",
            file=sys.stderr,
        )
    if found:
        print(
            f"export: {len(found)} 'not the same' decision(s) contradict the links; "
            f"see {out / CONFLICTS_NAME}",
            file=sys.stderr,
        )
    return ExportSummary(
        out, len(groups), sum(len(g) for g in groups), copied, tuple(missing), tuple(found)
    )
