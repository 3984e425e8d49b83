"""Top-k most similar gallery images for each query image -> CSV.

    python -m leopard_jax.match --embeddings gallery.npz [--query query.npz] --k 5 --out matches.csv

Without `--query` every gallery image is a query against the rest. A query never matches
itself: a gallery row is skipped when it is the same record (same key and crop file).
Similarities are computed in query x gallery blocks and merged into a running top-k, so
memory stays at one block whatever the gallery size.
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import sys
from collections.abc import Iterator

import numpy as np

from leopard_jax import embeddings_io

CSV_FIELDS = ("query_key", "query_path", "query_identity", "query_flank", "rank", "match_key", "match_path",
              "match_identity", "match_flank", "similarity")


def top_k(queries: embeddings_io.Embeddings, gallery: embeddings_io.Embeddings, k: int, *,
          query_block: int = 1024, gallery_block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(indices [Q, k] into the gallery, cosine similarities [Q, k]), best first; ties go to
    the lower gallery index. Slots with no candidate left hold index -1, similarity -inf."""
    if len(queries) and len(gallery) and queries.dims != gallery.dims:
        raise ValueError(f"query embeddings are {queries.dims}-d, gallery ones {gallery.dims}-d: "
                         "embed both with the same model")
    n_q = len(queries)
    best_sim = np.full((n_q, k), -np.inf, np.float32)
    best_idx = np.full((n_q, k), -1, np.int64)
    for q0 in range(0, n_q, query_block):
        q = slice(q0, min(q0 + query_block, n_q))
        q_idx = np.arange(q.start, q.stop)
        for g0 in range(0, len(gallery), gallery_block):
            g_idx = np.arange(g0, min(g0 + gallery_block, len(gallery)))
            sim = queries.embeddings[q] @ gallery.embeddings[g_idx].T
            same = embeddings_io.is_same_record(queries, q_idx[:, None], gallery, g_idx[None, :])
            sim[same] = -np.inf
            cand_sim = np.concatenate([best_sim[q], sim], axis=1)
            cand_idx = np.concatenate([best_idx[q], np.broadcast_to(g_idx, sim.shape)], axis=1)
            cand_idx = np.where(np.isneginf(cand_sim), -1, cand_idx)
            # order by similarity (descending), then gallery index; -1 (empty) last
            order = np.lexsort((np.where(cand_idx < 0, np.iinfo(np.int64).max, cand_idx), -cand_sim), axis=1)[:, :k]
            best_sim[q] = np.take_along_axis(cand_sim, order, axis=1)
            best_idx[q] = np.take_along_axis(cand_idx, order, axis=1)
    return best_idx, best_sim


def rows(queries: embeddings_io.Embeddings, gallery: embeddings_io.Embeddings, indices: np.ndarray,
         similarities: np.ndarray) -> Iterator[dict[str, str]]:
    """One CSV row per (query, rank) with a candidate."""
    for i in range(len(queries)):
        for rank, (j, s) in enumerate(zip(indices[i], similarities[i]), start=1):
            if j < 0:
                break
            yield {"query_key": queries.keys[i], "query_path": queries.paths[i], "query_identity": queries.identities[i],
                   "query_flank": queries.flanks[i], "rank": rank, "match_key": gallery.keys[j],
                   "match_path": gallery.paths[j], "match_identity": gallery.identities[j],
                   "match_flank": gallery.flanks[j], "similarity": f"{s:.6f}"}


def write_csv(path: str | os.PathLike, table: Iterator[dict[str, str]]) -> int:
    """Write atomically (temp + rename); returns the number of rows."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in table:
            writer.writerow(row)
            count += 1
    os.replace(tmp, path)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leopard_jax.match", description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", required=True, help="gallery .npz (from leopard_jax.embed)")
    parser.add_argument("--query", help="query .npz (default: every gallery image against the rest)")
    parser.add_argument("--k", type=int, default=5, help="matches per query (default 5)")
    parser.add_argument("--out", required=True, help="output CSV")
    args = parser.parse_args(argv)
    try:
        if args.k < 1:
            raise ValueError(f"--k must be at least 1, got {args.k}")
        gallery = embeddings_io.read(args.embeddings)
        queries = embeddings_io.read(args.query) if args.query else gallery
        indices, similarities = top_k(queries, gallery, args.k)
    except (ValueError, embeddings_io.EmbeddingsFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(gallery) and not np.all(indices >= 0):
        print(f"note: fewer than {args.k} gallery images are available to some queries; they get fewer rows",
              file=sys.stderr)
    count = write_csv(args.out, rows(queries, gallery, indices, similarities))
    print(f"{len(queries)} queries x top {args.k} of {len(gallery)} gallery images -> {args.out} ({count} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
