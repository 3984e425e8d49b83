"""Top-k most similar gallery images for each query image -> CSV.

    python -m leopard_jax.match --embeddings gallery.npz [--query query.npz] --k 5 --out matches.csv
    python -m leopard_jax.match --embeddings gallery.npz --rerank local --top-k 20|all \
        --out matches.csv

`--rerank local` matches each query's deep top-k by local features (SIFT, verified by
RANSAC; the dataset's store from `python -m leopard_jax.local`; the score expanded through
the query's strongly verified candidates, `local.rerank`), maps both scores to
P(same individual) and fuses them (`leopard_jax.local.calibration`), and orders the
candidates by the fused probability. On a labelled gallery matched against itself the
calibrator is cross-fitted by individual (no query is scored by a calibrator that saw its
individual) and the one fitted on all pairs is saved beside the model; with `--query` the
saved one is used. A query whose best fused probability is below the calibrator's
threshold is proposed as a new individual.

Without `--query` every gallery image is a query against the rest. A query never matches
itself: a gallery row is skipped when it is the same record (same key and crop file).
Similarities are computed in query x gallery blocks and merged into a running top-k, so
memory stays at one block whatever the gallery size.
"""

from __future__ import annotations

import csv
import os
import pathlib
import sys
from collections.abc import Iterator

import numpy as np
from absl import flags

from leopard_jax import cli, embeddings_io, ranking

CSV_FIELDS = (
    "query_key",
    "query_path",
    "query_identity",
    "query_flank",
    "rank",
    "match_key",
    "match_path",
    "match_identity",
    "match_flank",
    "similarity",
)
# with --rerank local: the deep rank, the local score and the calibrated probabilities
RERANK_FIELDS = (
    "deep_rank",
    "local_inliers",
    "local_score",
    "p_deep",
    "p_local",
    "p_fused",
    "new_individual",
)

FLAGS = flags.FlagValues()
_EMBEDDINGS = flags.DEFINE_string(
    "embeddings", None, "gallery .npz (from leopard_jax.embed)", flag_values=FLAGS, required=True
)
_QUERY = flags.DEFINE_string(
    "query", None, "query .npz (default: every gallery image against the rest)", flag_values=FLAGS
)
_K = flags.DEFINE_integer("k", 5, "matches per query", lower_bound=1, flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "output CSV", flag_values=FLAGS, required=True)
_RERANK = flags.DEFINE_enum(
    "rerank",
    "none",
    ["none", "local"],
    "re-rank the deep top-k by local features",
    flag_values=FLAGS,
)
_TOP_K = flags.DEFINE_string(
    "top-k",
    None,
    "candidates per query (overrides --k): a number, or 'all' (the whole gallery)",
    flag_values=FLAGS,
)
_CALIBRATOR = flags.DEFINE_string(
    "calibrator",
    None,
    "calibrator JSON (default: calibrator.json in the model dir)",
    flag_values=FLAGS,
)
_GEOMETRY = flags.DEFINE_enum(
    "geometry",
    "affine",
    ["affine", "homography"],
    "transform verified between two crops",
    flag_values=FLAGS,
)


def top_k(
    queries: embeddings_io.Embeddings,
    gallery: embeddings_io.Embeddings,
    k: int,
    *,
    query_block: int = 1024,
    gallery_block: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices [Q, k] into the gallery, cosine similarities [Q, k]), best first; ties go to
    the lower gallery index. A query never matches its own record; slots with no candidate
    left hold index -1, similarity -inf."""
    if len(queries) and len(gallery) and queries.dims != gallery.dims:
        raise ValueError(
            f"query embeddings are {queries.dims}-d, gallery ones {gallery.dims}-d: "
            "embed both with the same model"
        )

    def same_record(q_rows, g_rows):
        return embeddings_io.is_same_record(queries, q_rows[:, None], gallery, g_rows[None, :])

    return ranking.top_k(
        queries.embeddings,
        gallery.embeddings,
        k,
        exclude=same_record,
        query_block=query_block,
        gallery_block=gallery_block,
    )


def rows(
    queries: embeddings_io.Embeddings,
    gallery: embeddings_io.Embeddings,
    indices: np.ndarray,
    similarities: np.ndarray,
    extra: dict[str, np.ndarray] | None = None,
) -> Iterator[dict[str, str]]:
    """One CSV row per (query, rank) with a candidate; `extra` adds columns ([Q, k] each)."""
    for i in range(len(queries)):
        for rank, (j, s) in enumerate(zip(indices[i], similarities[i]), start=1):
            if j < 0:
                break
            more = {name: _cell(values[i, rank - 1]) for name, values in (extra or {}).items()}
            yield more | {
                "query_key": queries.keys[i],
                "query_path": queries.paths[i],
                "query_identity": queries.identities[i],
                "query_flank": queries.flanks[i],
                "rank": rank,
                "match_key": gallery.keys[j],
                "match_path": gallery.paths[j],
                "match_identity": gallery.identities[j],
                "match_flank": gallery.flanks[j],
                "similarity": f"{s:.6f}",
            }


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.6f}"
    return str(value.item() if isinstance(value, np.generic) else value)


def write_csv(path: str | os.PathLike, table: Iterator[dict[str, str]], fields=CSV_FIELDS) -> int:
    """Write atomically (temp + rename); returns the number of rows."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in table:
            writer.writerow(row)
            count += 1
    os.replace(tmp, path)
    return count


def run(argv: list[str]) -> int:
    if argv:
        raise cli.CommandError(f"unexpected arguments {argv}; see --help")
    gallery = embeddings_io.read(_EMBEDDINGS.value)
    queries = embeddings_io.read(_QUERY.value) if _QUERY.value else gallery
    k = candidates_per_query(_TOP_K.value, _K.value, len(gallery))
    indices, similarities = top_k(queries, gallery, k)
    if len(gallery) and not np.all(indices >= 0) and _TOP_K.value != "all":
        print(
            f"note: fewer than {k} gallery images are available to some queries; "
            "they get fewer rows",
            file=sys.stderr,
        )
    if _RERANK.value == "local":
        table, fields = reranked_rows(
            queries, gallery, indices, similarities, same_set=not _QUERY.value
        )
    else:
        table, fields = rows(queries, gallery, indices, similarities), CSV_FIELDS
    count = write_csv(_OUT.value, table, fields)
    print(
        f"{len(queries)} queries x top {k} of {len(gallery)} gallery images "
        f"-> {_OUT.value} ({count} rows)"
    )
    return 0


def candidates_per_query(top_k_flag: str | None, k: int, gallery_size: int) -> int:
    """--top-k (a number or 'all') when given, else --k."""
    if top_k_flag is None:
        return k
    if top_k_flag == "all":
        return max(gallery_size, 1)
    try:
        value = int(top_k_flag)
    except ValueError:
        value = 0
    if value < 1:
        raise cli.CommandError(f"--top-k={top_k_flag!r}: give a positive number or 'all'")
    return value


def calibrator_path(gallery) -> pathlib.Path:
    from leopard_jax.local import calibration

    if _CALIBRATOR.value:
        return pathlib.Path(_CALIBRATOR.value)
    return calibration.default_path(gallery.meta, _EMBEDDINGS.value)


def saved_calibrator(gallery) -> dict:
    """The saved calibrator for the gallery's model; one line saying how to make one."""
    from leopard_jax.local import calibration

    path = calibrator_path(gallery)
    if not path.is_file():
        raise calibration.CalibratorError(
            f"{path}: no calibrator; make one by matching a labelled gallery against itself "
            f"(`python -m leopard_jax.match --embeddings LABELLED.npz --rerank local ...`) "
            "or pass --calibrator"
        )
    return calibration.load(path, str(gallery.meta.get("model_fingerprint", "")))


def reranked_rows(queries, gallery, indices, similarities, *, same_set: bool):
    """(CSV rows ordered by fused probability, their fields) for --rerank local."""
    from leopard_jax.local import rerank

    if not same_set or not np.any(queries.identities != ""):
        saved_calibrator(gallery)  # fail before the matching, not after
    stores = rerank.stores_for(queries, gallery)
    inliers, local = rerank.local_scores(
        queries, gallery, indices, stores, model=_GEOMETRY.value, progress=True
    )
    probability, threshold = calibrated(queries, gallery, indices, similarities, local, same_set)
    # fused order; ties (and empty slots, at -1) keep the deep order
    fused = np.where(indices >= 0, probability["fused"], -1.0)
    order = np.argsort(-fused, axis=1, kind="stable")
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    best = fused.max(axis=1, initial=-1.0)
    extra = {
        "deep_rank": take(np.broadcast_to(np.arange(1, indices.shape[1] + 1), indices.shape)),
        "local_inliers": take(inliers),
        "local_score": take(local),
        **{f"p_{name}": take(p) for name, p in probability.items()},
        "new_individual": np.broadcast_to(
            ((best < threshold) & (best >= 0))[:, None], indices.shape
        ).astype(int),
    }
    table = rows(queries, gallery, take(indices), take(similarities), extra)
    return table, CSV_FIELDS + RERANK_FIELDS


def calibrated(queries, gallery, indices, similarities, local, same_set: bool):
    """({"deep", "local", "fused"} -> P(same) [Q, k], new-individual threshold).

    A labelled gallery against itself is cross-fitted by individual and the calibrator
    fitted on all its pairs saved; otherwise the saved calibrator is used."""
    from leopard_jax import evaluate
    from leopard_jax.local import calibration

    fingerprint = str(gallery.meta.get("model_fingerprint", ""))
    path = calibrator_path(gallery)
    q_class = evaluate.class_labels(queries)
    g_class = evaluate.class_labels(gallery)
    real = indices >= 0
    r, c = np.nonzero(real)
    labelled = (q_class[r] != "") & (g_class[indices[r, c]] != "")
    out = {n: np.zeros(indices.shape) for n in ("deep", "local", "fused")}
    if same_set and labelled.any():
        r, c = r[labelled], c[labelled]
        deep, pair_local = similarities[r, c], local[r, c]
        same = q_class[r] == g_class[indices[r, c]]
        groups, candidate_groups = q_class[r], g_class[indices[r, c]]
        for name, p in calibration.cross_fit(
            deep, pair_local, same, groups, candidate_groups=candidate_groups
        ).items():
            out[name][r, c] = p
        calibrator = calibration.fit(
            deep,
            pair_local,
            same,
            groups=groups,
            candidate_groups=candidate_groups,
            model_fingerprint=fingerprint,
        )
        calibrator["ece_cross_fitted"] = {
            name: calibration.ece(out[name][r, c], same) for name in out
        }
        calibration.save(path, calibrator)
        print(
            f"calibrator fitted on {len(same)} labelled pairs ({int(same.sum())} same), "
            f"fusion: {calibrator['fusion']} -> {path}; ECE (cross-fitted) "
            + ", ".join(f"{n} {v:.3f}" for n, v in calibrator["ece_cross_fitted"].items())
        )
        return out, calibrator["new_individual_threshold"]
    calibrator = saved_calibrator(gallery)
    r, c = np.nonzero(real)
    for name, p in calibration.probabilities(calibrator, similarities[r, c], local[r, c]).items():
        out[name][r, c] = p
    return out, calibrator["new_individual_threshold"]


def main(argv: list[str] | None = None) -> int:
    from leopard_jax.local import calibration, store

    return cli.run(
        FLAGS,
        run,
        argv,
        errors=(
            ValueError,
            embeddings_io.EmbeddingsFileError,
            store.StoreError,
            calibration.CalibratorError,
        ),
        prog="python -m leopard_jax.match",
    )


if __name__ == "__main__":
    sys.exit(main())
