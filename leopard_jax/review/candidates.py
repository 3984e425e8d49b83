"""The images under review and, for an anchor, the most similar images still worth asking about.

A candidate is skipped when asking would be wasted effort: it is already in the anchor's
individual (linked directly or through other confirmed links), or its individual was
already declared "not the same" as the anchor's individual (a "no" to one image of an
individual is a "no" to all of them).
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from leopard_jax import embeddings_io, ranking
from leopard_jax.review import store as store_lib


@dataclasses.dataclass(frozen=True)
class Catalog:
    """The rows of embeddings.npz under review, in file order, as plain Python strings
    (they go into SQLite and JSON), with each key's row: keys are the store's image ids."""

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
        return [
            store_lib.ImageRow(k, p, c, i, f, n)
            for n, (k, p, c, i, f) in enumerate(
                zip(self.keys, self.paths, self.crops, self.identities, self.flanks)
            )
        ]


def load_catalog(path: str | pathlib.Path) -> Catalog:
    """Read (and check) the file with `embeddings_io.read`; the review also needs a row."""
    data = embeddings_io.read(path)
    if len(data) == 0:
        raise embeddings_io.EmbeddingsFileError(
            f"{path}: holds no images; embed a dataset into it with `python -m leopard_jax.embed`"
        )
    texts = {field: tuple(getattr(data, field).tolist()) for field in embeddings_io.STRING_FIELDS}
    index = {key: row for row, key in enumerate(texts["keys"])}
    return Catalog(embeddings=data.embeddings, meta=data.meta, index=index, **texts)


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


def top_candidates(
    catalog: Catalog, graph: store_lib.MatchGraph, anchor: int, k: int = 5
) -> list[tuple[int, float]]:
    """The k most similar rows (cosine, highest first, ties by row) still open questions."""
    excluded = excluded_components(graph, catalog.keys[anchor])
    closed = np.array([c in excluded for c in component_of_rows(catalog, graph)], bool)
    closed[anchor] = True
    return _ranked(catalog, anchor, closed, k)


def same_individual(
    catalog: Catalog, graph: store_lib.MatchGraph, anchor: int
) -> list[tuple[int, float]]:
    """The other rows already in the anchor's individual, most similar first."""
    own = graph.component(catalog.keys[anchor])
    others = np.array([c != own for c in component_of_rows(catalog, graph)], bool)
    others[anchor] = True
    return _ranked(catalog, anchor, others, len(catalog))  # one k for every anchor: one compile


def _ranked(catalog: Catalog, anchor: int, skip: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(row, cosine) of the anchor's k best rows outside `skip` [N], by `ranking.top_k`."""
    rows, scores = ranking.top_k(
        catalog.embeddings[anchor : anchor + 1],
        catalog.embeddings,
        k,
        exclude=lambda _, g_rows: skip[g_rows][None, :],
    )
    return [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]


def next_unreviewed(catalog: Catalog, graph: store_lib.MatchGraph, after: int = -1) -> int | None:
    """The first row not yet reviewed after `after` (wrapping around); None when all are done."""
    n = len(catalog)
    for step in range(1, n + 1):
        row = (after + step) % n
        if catalog.keys[row] not in graph.reviewed:
            return row
    return None
