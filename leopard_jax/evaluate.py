"""Retrieval metrics of any labelled embeddings file -> metrics.json, tkrmd.png, a table.

    python -m leopard_jax.evaluate --embeddings embeddings.npz [--out DIR] [--k-max 10]
    python -m leopard_jax.evaluate --embeddings embeddings.npz --matches matches.csv --out DIR

With `--matches` (a CSV from `python -m leopard_jax.match --rerank local`) the rankings in
the CSV are scored instead, side by side: `deep` (the deep order), `local` (by verified
inliers) and `fused` (by fused probability): DTkAP/TkRMD, the calibration error of each
probability, and `auroc`: how well the best probability of a query tells a known
individual (one with a class-mate in the gallery) from a new one, with an interval that
resamples individuals. Differences fused − deep and fused − local of per-query DT5AP
come with `metrics.paired_bootstrap` intervals.

Every labelled image is a query against all other labelled images (the paper's
one-versus-all test). Nothing here knows about leopards: any species' embeddings work
(the paper's tiger test). Rows with an empty identity are left out, with a note.

A class is identity + flank: the paper's individuals are "flank IDs" (left and right
flanks of one animal carry different patterns and cannot match each other). Rows without
a flank are classed by identity alone; `--ignore-flank` classes every row by identity.

The plot is drawn with OpenCV, already a dependency, rather than matplotlib: a ten-point
line chart does not justify a plotting stack, and its pixels are exactly testable.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
from typing import Any

import numpy as np
from absl import flags

from leopard_jax import cli, embeddings_io

PLOT_SIZE = (480, 640)  # height, width
_MARGIN = dict(left=80, right=30, top=50, bottom=60)
LINE_BGR = (180, 90, 20)
GRID_BGR = (225, 225, 225)
INK_BGR = (40, 40, 40)

FLAGS = flags.FlagValues()
_EMBEDDINGS = flags.DEFINE_string(
    "embeddings", None, ".npz from leopard_jax.embed", flag_values=FLAGS, required=True
)
_OUT = flags.DEFINE_string(
    "out",
    None,
    "output directory (default: <embeddings stem>_eval beside the file)",
    flag_values=FLAGS,
)
_K_MAX = flags.DEFINE_integer(
    "k-max", 10, "largest k of DTkAP/TkRMD", lower_bound=1, flag_values=FLAGS
)
_IGNORE_FLANK = flags.DEFINE_boolean(
    "ignore-flank", False, "class rows by identity only", flag_values=FLAGS
)
_SPLIT = flags.DEFINE_string(
    "split",
    None,
    "evaluate only identities of this split of the dataset's split.json "
    "(e.g. test: the held-out individuals)",
    flag_values=FLAGS,
)
_MATCHES = flags.DEFINE_string(
    "matches",
    None,
    "match CSV from `leopard_jax.match --rerank local`: score its deep, local and fused rankings",
    flag_values=FLAGS,
)
_DATA = flags.DEFINE_string(
    "data",
    None,
    "dataset dir holding split.json (default: the one recorded in the file)",
    flag_values=FLAGS,
)


def class_labels(data: embeddings_io.Embeddings, *, by_flank: bool = True) -> np.ndarray:
    """identity/flank (or identity) per row; "" for unlabelled rows."""
    identities = data.identities.astype(str)
    if not by_flank:
        return identities
    with_flank = np.char.add(np.char.add(identities, "/"), data.flanks.astype(str))
    return np.where((identities != "") & (data.flanks != ""), with_flank, identities)


def evaluate(
    data: embeddings_io.Embeddings, *, k_max: int = 10, by_flank: bool = True
) -> dict[str, Any]:
    """metrics.retrieval_metrics over the labelled rows, plus how many rows were left out."""
    from leopard_jax import metrics

    labels = class_labels(data, by_flank=by_flank)
    labelled = labels != ""
    if labelled.sum() < 2:
        raise ValueError(
            f"only {int(labelled.sum())} labelled images; evaluation needs at least 2 "
            "(identities come from the dataset's identity column)"
        )
    result = metrics.retrieval_metrics(data.embeddings[labelled], labels[labelled], k_max=k_max)
    result["k_ranked"] = len(result["TkRMD"])
    result.update(extend_curves(result, k_max))
    result["n_unlabelled_ignored"] = int((~labelled).sum())
    result["classes"] = "identity/flank" if by_flank else "identity"
    return result


def extend_curves(result: dict[str, Any], k_max: int) -> dict[str, Any]:
    """Curves and DT{k}AP/T{k}RMD up to k_max even when a set has fewer than k_max + 1
    images. Exact, not an estimate: with N images every query ranks all N - 1 others, so
    for k >= N - 1 the top k holds them all (TkRMD(k) = TkRMD(N - 1)) and the dynamic
    k_i = min(|C_i| - 1, k) no longer changes (DTkAP(k) = DTkAP(N - 1))."""
    out = {}
    for name in ("DTkAP", "TkRMD"):
        curve = list(result[name])
        out[name] = curve + curve[-1:] * (k_max - len(curve))
    for k in (1, 5, 10):
        if k <= k_max:
            out[f"DT{k}AP"], out[f"T{k}RMD"] = out["DTkAP"][k - 1], out["TkRMD"][k - 1]
    return out


def restrict_to_split(
    data: embeddings_io.Embeddings, split: str, dataset_dir=None
) -> embeddings_io.Embeddings:
    """Rows the dataset puts in `split` (e.g. the held-out "test" individuals): by record key
    (a closed-set split.json, or the split the input itself gave), else by identity
    (split.json's split by individual). The dataset defaults to the one in the file's meta."""
    from leopard_jax.data import records

    dataset_dir = dataset_dir or data.meta.get("dataset")
    if not dataset_dir:
        raise ValueError("the file records no dataset dir; pass --data DATASET_DIR with --split")
    by_key = {key: name for key, name in records.split_of_keys(dataset_dir).items() if name}
    by_identity = records.load_split(dataset_dir)
    if not by_key and not by_identity:
        raise ValueError(
            f"{dataset_dir}: no split.json; make one with `python -m leopard_jax.data.split` "
            "or drop --split"
        )
    names = sorted(set(by_key.values()) | set(by_identity.values()))
    if split not in names:
        raise ValueError(f"{dataset_dir}: has no split {split!r}; it has {names}")
    keep = np.array(
        [
            (by_key.get(key) or by_identity.get(identity)) == split
            for key, identity in zip(data.keys.tolist(), data.identities.tolist())
        ],
        bool,
    )
    return embeddings_io.select(data, keep)


def json_safe(value):
    """NaN/inf -> None, so metrics.json is strict JSON (browsers and jq reject NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


# --------------------------------------------------------------------------- the plot


def y_range(curve: list[float]) -> tuple[float, float]:
    """From the tenth below the curve's minimum up to 1: detail where the curve is."""
    low = math.floor(10 * min(curve)) / 10 if curve else 0.0
    return min(max(low, 0.0), 0.9), 1.0


def curve_point(k: int, value: float, k_max: int, y_lo: float, size=PLOT_SIZE) -> tuple[int, int]:
    """Pixel (x, y) of TkRMD(k) = value in the plot."""
    height, width = size
    x0, x1 = _MARGIN["left"], width - _MARGIN["right"]
    y0, y1 = height - _MARGIN["bottom"], _MARGIN["top"]
    x = x0 + (x1 - x0) * ((k - 1) / max(k_max - 1, 1))
    y = y0 + (y1 - y0) * ((value - y_lo) / (1.0 - y_lo))
    return int(round(x)), int(round(y))


def render_tkrmd(curve: list[float], title: str = "", size=PLOT_SIZE) -> np.ndarray:
    """BGR uint8 image of TkRMD against k (the paper's Figure 8)."""
    import cv2

    height, width = size
    image = np.full((height, width, 3), 255, np.uint8)
    k_max = len(curve)
    y_lo, _ = y_range(curve)
    font, small = cv2.FONT_HERSHEY_SIMPLEX, 0.45
    left, right = _MARGIN["left"], width - _MARGIN["right"]
    top, bottom = _MARGIN["top"], height - _MARGIN["bottom"]
    step = 0.1 if 1 - y_lo > 0.3 else 0.05 if 1 - y_lo > 0.15 else 0.02
    for tick in np.arange(y_lo, 1.0 + 1e-9, step):
        _, y = curve_point(1, tick, k_max, y_lo, size)
        cv2.line(image, (left, y), (right, y), GRID_BGR, 1)
        cv2.putText(image, f"{tick:.2f}", (left - 45, y + 5), font, small, INK_BGR, 1, cv2.LINE_AA)
    for k in range(1, k_max + 1):
        x, _ = curve_point(k, y_lo, k_max, y_lo, size)
        cv2.line(image, (x, bottom), (x, bottom + 5), INK_BGR, 1)
        cv2.putText(image, str(k), (x - 5, bottom + 20), font, small, INK_BGR, 1, cv2.LINE_AA)
    cv2.rectangle(image, (left, top), (right, bottom), INK_BGR, 1)
    points = np.array(
        [curve_point(k, v, k_max, y_lo, size) for k, v in enumerate(curve, start=1)], np.int32
    )
    cv2.polylines(image, [points.reshape(-1, 1, 2)], False, LINE_BGR, 2, cv2.LINE_AA)
    for x, y in points:
        cv2.circle(image, (int(x), int(y)), 4, LINE_BGR, -1, cv2.LINE_AA)
    cv2.putText(
        image,
        "k (ranks inspected)",
        ((left + right) // 2 - 75, height - 15),
        font,
        0.5,
        INK_BGR,
        1,
        cv2.LINE_AA,
    )
    cv2.putText(image, "TkRMD", (10, top - 15), font, 0.5, INK_BGR, 1, cv2.LINE_AA)
    cv2.putText(image, title, (left, 30), font, 0.55, INK_BGR, 1, cv2.LINE_AA)
    return image


def write_png(path: pathlib.Path, image: np.ndarray) -> None:
    import cv2

    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    _write_atomic(path, encoded.tobytes())


def _write_atomic(path: pathlib.Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the table


def format_table(result: dict[str, Any]) -> str:
    def num(v):
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"

    lines = [
        f"queries with a class-mate: {result['n_queries']} of {result['n_samples']} images, "
        f"{result['n_classes']} classes ({result['classes']})"
    ]
    for key in ("DT5AP", "T1RMD", "T5RMD", "CCDR", "angle_same_mean", "angle_diff_mean"):
        if key in result:
            lines.append(f"  {key:<16} {num(result[key])}")
    lines.append("  k      " + " ".join(f"{k:>6d}" for k in range(1, len(result["TkRMD"]) + 1)))
    lines.append("  TkRMD  " + " ".join(f"{v:6.3f}" for v in result["TkRMD"]))
    return "\n".join(lines)


def default_out(embeddings_path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(embeddings_path)
    return path.with_name(f"{path.stem}_eval")


def load(path: str, split: str | None, dataset_dir: str | None) -> embeddings_io.Embeddings:
    """The file's rows, restricted to `split` when given; errors name the file."""
    try:
        data = embeddings_io.read(path)
        return restrict_to_split(data, split, dataset_dir) if split else data
    except ValueError as e:
        raise cli.CommandError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from e


def run(argv: list[str]) -> int:
    if argv:
        raise cli.CommandError(f"unexpected arguments {argv}; see --help")
    path, k_max = _EMBEDDINGS.value, _K_MAX.value
    data = load(path, _SPLIT.value, _DATA.value)
    out = pathlib.Path(_OUT.value) if _OUT.value else default_out(path)
    if _MATCHES.value:
        return run_matches(data, out, k_max)
    try:
        result = evaluate(data, k_max=k_max, by_flank=not _IGNORE_FLANK.value)
    except ValueError as e:
        raise cli.CommandError(f"{path}: {e}") from e
    out.mkdir(parents=True, exist_ok=True)
    result["embeddings"] = str(pathlib.Path(path).absolute())
    result["split"] = _SPLIT.value or ""
    _write_atomic(out / "metrics.json", json.dumps(json_safe(result), indent=2).encode())
    title = f"TkRMD, {result['n_queries']} queries, {result['n_classes']} classes"
    write_png(out / "tkrmd.png", render_tkrmd(result["TkRMD"], title))
    if result["n_unlabelled_ignored"]:
        print(f"note: {result['n_unlabelled_ignored']} images without identity ignored")
    if result["k_ranked"] < k_max:
        print(
            f"note: only {result['k_ranked']} other images per query: values for larger k equal "
            f"those at k = {result['k_ranked']}"
        )
    print(format_table(result))
    print(f"wrote {out / 'metrics.json'} and {out / 'tkrmd.png'}")
    return 0


def run_matches(data: embeddings_io.Embeddings, out: pathlib.Path, k_max: int) -> int:
    from leopard_jax import match_eval  # it builds on this module's class_labels/extend_curves

    by_query = match_eval.read_matches(_MATCHES.value)
    try:
        result = match_eval.evaluate_matches(
            data, by_query, k_max=k_max, by_flank=not _IGNORE_FLANK.value
        )
    except ValueError as e:
        raise cli.CommandError(f"{_MATCHES.value}: {e}") from e
    result["embeddings"] = str(pathlib.Path(_EMBEDDINGS.value).absolute())
    result["matches"] = str(pathlib.Path(_MATCHES.value).absolute())
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "metrics.json", json.dumps(json_safe(result), indent=2).encode())
    print(match_eval.format_matches_table(result))
    print(f"wrote {out / 'metrics.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(FLAGS, run, argv, prog="python -m leopard_jax.evaluate")


if __name__ == "__main__":
    sys.exit(main())
