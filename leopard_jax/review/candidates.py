"""The images under review and, for an anchor, the most similar images still worth asking about.

A candidate is skipped when asking would be wasted effort: it is already in the anchor's
individual (linked directly or through other confirmed links), or its individual was
already declared "not the same" as the anchor's individual (a "no" to one image of an
individual is a "no" to all of them).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import zipfile

import numpy as np

from leopard_jax.review import store as store_lib

TEXT_FIELDS = ("keys", "paths", "identities", "flanks", "crops", "edges")


class CatalogError(ValueError):
    """An embeddings file that cannot be reviewed; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Catalog:
    """The contents of embeddings.npz (WORKSPACE.md contract), rows in file order."""
    embeddings: np.ndarray  # float32 [N, D], unit norm
    keys: tuple[str, ...]
    paths: tuple[str, ...]
    identities: tuple[str, ...]
    flanks: tuple[str, ...]
    crops: tuple[str, ...]
    edges: tuple[str, ...]
    meta: dict
    index: dict[str, int]  # key -> row

    def __len__(self) -> int:
        return len(self.keys)

    def image_rows(self) -> list[store_lib.ImageRow]:
        return [store_lib.ImageRow(k, p, c, i, f, n) for n, (k, p, c, i, f) in enumerate(
            zip(self.keys, self.paths, self.crops, self.identities, self.flanks))]


def load_catalog(path: str | pathlib.Path) -> Catalog:
    path = pathlib.Path(path)
    fix = "pass the embeddings.npz written by `python -m leopard_jax.embed`"
    if not path.is_file():
        raise CatalogError(f"embeddings file {path} does not exist; {fix}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CatalogError(f"embeddings file {path} cannot be read ({e}); {fix}") from e
    missing = [name for name in ("embeddings",) + TEXT_FIELDS if name not in arrays]
    if missing:
        raise CatalogError(f"embeddings file {path} lacks {', '.join(missing)}; {fix}")
    emb = np.asarray(arrays["embeddings"], np.float32)
    if emb.ndim != 2 or len(emb) == 0:
        raise CatalogError(f"embeddings file {path}: 'embeddings' must be a non-empty [N, D] array, "
                           f"got shape {emb.shape}; {fix}")
    texts = {}
    for name in TEXT_FIELDS:
        column = arrays[name]
        if column.shape != (len(emb),):
            raise CatalogError(f"embeddings file {path}: '{name}' has shape {column.shape}, "
                               f"expected ({len(emb)},) like 'embeddings'; {fix}")
        texts[name] = tuple(str(x) for x in column.tolist())
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if not np.all(np.isfinite(emb)) or np.any(norms == 0):
        raise CatalogError(f"embeddings file {path} holds zero or non-finite embeddings; {fix}")
    keys = texts["keys"]
    index = {}
    for row, key in enumerate(keys):
        if not key:
            raise CatalogError(f"embeddings file {path}: keys[{row}] is empty; every image needs a unique key")
        if key in index:
            raise CatalogError(f"embeddings file {path}: key {key!r} appears at rows {index[key]} and {row}; "
                               "keys must be unique")
        index[key] = row
    meta = {}
    if "meta" in arrays:
        try:
            meta = json.loads(str(arrays["meta"]))
        except json.JSONDecodeError:
            meta = {"raw": str(arrays["meta"])}
    return Catalog(embeddings=emb / norms, meta=meta, index=index, **texts)


def component_of_rows(catalog: Catalog, graph: store_lib.MatchGraph) -> list[str]:
    return [graph.component(k) for k in catalog.keys]


def excluded_components(graph: store_lib.MatchGraph, anchor_key: str) -> set[str]:
    """The anchor's own individual and every individual declared "not the same" as it."""
    own = graph.component(anchor_key)
    excluded = {own}
    for a, b in graph.not_same:
        ca, cb = graph.component(a), graph.component(b)
        if ca == own:
            excluded.add(cb)
        if cb == own:
            excluded.add(ca)
    return excluded


def top_candidates(catalog: Catalog, graph: store_lib.MatchGraph, anchor: int,
                   k: int = 5) -> list[tuple[int, float]]:
    """The k most similar rows (cosine, highest first, ties by row) that are still open questions."""
    scores = catalog.embeddings @ catalog.embeddings[anchor]
    excluded = excluded_components(graph, catalog.keys[anchor])
    open_rows = np.array([c not in excluded for c in component_of_rows(catalog, graph)], bool)
    open_rows[anchor] = False
    rows = np.flatnonzero(open_rows)
    order = np.lexsort((rows, -scores[rows]))[:k]  # last key is primary: score desc, then row
    return [(int(rows[i]), float(scores[rows[i]])) for i in order]


def same_individual(catalog: Catalog, graph: store_lib.MatchGraph, anchor: int) -> list[tuple[int, float]]:
    """The other rows already in the anchor's individual, most similar first."""
    own = graph.component(catalog.keys[anchor])
    scores = catalog.embeddings @ catalog.embeddings[anchor]
    rows = [r for r, c in enumerate(component_of_rows(catalog, graph)) if c == own and r != anchor]
    rows.sort(key=lambda r: (-scores[r], r))
    return [(r, float(scores[r])) for r in rows]


def next_unreviewed(catalog: Catalog, graph: store_lib.MatchGraph, after: int = -1) -> int | None:
    """The first row not yet reviewed after `after` (wrapping around); None when all are done."""
    n = len(catalog)
    for step in range(1, n + 1):
        row = (after + step) % n
        if catalog.keys[row] not in graph.reviewed:
            return row
    return None
