"""evaluate: metrics of a hand-built layout against numbers worked out by hand, unlabelled
rows ignored, flank-aware classes, the plot's points, and the command's files."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from leopard_jax import embeddings_io, evaluate

# Points on the unit circle (degrees). No two distances from one query are equal, so the
# rankings below are unambiguous. "u" is unlabelled and lies between a1 and a2: counted,
# it would change their rankings and the smallest angle.
LAYOUT = [
    ("a1", "A", 0),
    ("a2", "A", 10),
    ("a3", "A", 100),
    ("b1", "B", 25),
    ("b2", "B", 110),
    ("c1", "C", 215),
    ("u", "", 5),
]
# Rankings by hand (angle to each other labelled point, nearest first), ✓ = same class:
#   a1: a2 10✓, b1 25, a3 100✓, b2 110, c1 145   -> k_i = 2: DT5AP = (1 + 1/2)/2 = 0.75
#   a2: a1 10✓, b1 15, a3 90✓, b2 100, c1 155    -> 0.75
#   a3: b2 10, b1 75, a2 90✓, a1 100✓, c1 115    -> (0 + 0)/2 = 0; first match at rank 3
#   b1: a2 15, a1 25, a3 75, b2 85✓, c1 170      -> k_i = 1: 0; first match at rank 4
#   b2: a3 10, b1 85✓, a2 100, c1 105, a1 110    -> 0; first match at rank 2
#   c1: singleton, not a query
HAND = {
    "DT5AP": (0.75 + 0.75) / 5,
    # k = 1..10; 6 labelled images rank 5 others, so k > 5 repeats k = 5 (all others seen)
    "TkRMD": [2 / 5, 3 / 5, 4 / 5, 5 / 5, 5 / 5] + [1.0] * 5,
    "n_queries": 5,
    # same-class pairs 10, 100, 90 (A) and 85 (B); 11 cross-class pairs summing to 1025
    "angle_same_mean": (10 + 100 + 90 + 85) / 4,
    "angle_diff_mean": 1025 / 11,
}


def layout_embeddings(flanks=None) -> embeddings_io.Embeddings:
    radians = np.deg2rad([deg for _, _, deg in LAYOUT])
    vectors = np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)
    return embeddings_io.make(
        vectors, keys=[k for k, _, _ in LAYOUT], identities=[i for _, i, _ in LAYOUT], flanks=flanks
    )


def hand_ccdr() -> float:
    """Per query: mean (1 - cos) to its class-mates over mean (1 - cos) to the others."""
    labelled = [(name, ident, deg) for name, ident, deg in LAYOUT if ident]
    ratios = []
    for name, ident, deg in labelled:
        same = [1 - np.cos(np.deg2rad(deg - d)) for n, i, d in labelled if i == ident and n != name]
        diff = [1 - np.cos(np.deg2rad(deg - d)) for n, i, d in labelled if i != ident]
        if same:
            ratios.append(np.mean(same) / np.mean(diff))
    return float(np.mean(ratios))


def test_metrics_equal_the_hand_computed_ones():
    result = evaluate.evaluate(layout_embeddings(), k_max=10)
    assert result["DT5AP"] == pytest.approx(HAND["DT5AP"], abs=1e-6)
    assert result["T1RMD"] == pytest.approx(0.4) and result["T5RMD"] == pytest.approx(1.0)
    assert result["TkRMD"] == pytest.approx(HAND["TkRMD"])
    assert (
        result["n_queries"] == 5
        and result["n_unlabelled_ignored"] == 1
        and result["n_classes"] == 3
    )
    assert result["k_ranked"] == 5 and result["DTkAP"][5:] == [result["DTkAP"][4]] * 5
    assert result["CCDR"] == pytest.approx(hand_ccdr(), rel=1e-4)
    assert result["angle_same_mean"] == pytest.approx(HAND["angle_same_mean"], abs=1e-3)
    assert result["angle_diff_mean"] == pytest.approx(HAND["angle_diff_mean"], abs=1e-3)
    assert result["angles_smallest"][0] == pytest.approx(10.0, abs=1e-3)  # not 5: u is ignored


def test_flanks_split_classes_unless_ignored():
    # A's three images as two flanks: a1/a2 left, a3 right -> a3 has no class-mate
    flanks = ["left", "left", "right", "", "", "", ""]
    split = evaluate.evaluate(layout_embeddings(flanks))
    assert split["n_classes"] == 4 and split["n_queries"] == 4
    # a1, a2: k_i = 1, match at rank 1 -> 1 each; b1, b2 -> 0
    assert split["DT5AP"] == pytest.approx(0.5)
    merged = evaluate.evaluate(layout_embeddings(flanks), by_flank=False)
    assert merged["DT5AP"] == pytest.approx(HAND["DT5AP"], abs=1e-6)


def test_plot_puts_each_point_on_the_curve():
    curve = [0.62, 0.7, 0.81, 0.9, 0.93, 0.95, 0.95, 0.97, 1.0, 1.0]
    image = evaluate.render_tkrmd(curve, "test")
    y_lo, _ = evaluate.y_range(curve)
    assert y_lo == pytest.approx(0.6)
    for k, value in enumerate(curve, start=1):
        x, y = evaluate.curve_point(k, value, len(curve), y_lo)
        assert tuple(image[y, x]) == evaluate.LINE_BGR, (k, value)
    lowest = evaluate.curve_point(1, 0.62, len(curve), y_lo)
    highest = evaluate.curve_point(10, 1.0, len(curve), y_lo)
    assert lowest[1] > highest[1] and lowest[0] < highest[0]  # up and to the right
    assert tuple(image[lowest[1] - 40, lowest[0] + 2]) != evaluate.LINE_BGR  # not a filled canvas


def test_command_writes_metrics_and_plot(tmp_path, capsys):
    path = tmp_path / "e.npz"
    embeddings_io.write(path, layout_embeddings())
    assert evaluate.main(["--embeddings", str(path), "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert (
        "1 images without identity ignored" in printed
        and "equal those at k = 5" in printed
        and "DT5AP" in printed
    )
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key in (
        "DT5AP",
        "T1RMD",
        "T5RMD",
        "TkRMD",
        "CCDR",
        "n_queries",
        "angle_same_mean",
        "angle_diff_mean",
    ):
        assert key in saved
    assert saved["DT5AP"] == pytest.approx(HAND["DT5AP"], abs=1e-6)
    plot = cv2.imread(str(tmp_path / "ev" / "tkrmd.png"))
    assert plot.shape == (*evaluate.PLOT_SIZE, 3)
    assert evaluate.main(["--embeddings", str(path)]) == 0  # default: beside the file
    assert (tmp_path / "e_eval" / "metrics.json").is_file()


def test_undefined_values_are_json_null_and_unlabelled_sets_are_refused(tmp_path, capsys):
    one_class = embeddings_io.make(
        np.eye(3, dtype=np.float32), keys=list("abc"), identities=["x"] * 3
    )
    path = tmp_path / "one.npz"
    embeddings_io.write(path, one_class)
    assert evaluate.main(["--embeddings", str(path), "--out", str(tmp_path / "o")]) == 0
    text = (tmp_path / "o" / "metrics.json").read_text()
    assert json.loads(text)["CCDR"] is None and "NaN" not in text
    capsys.readouterr()
    unlabelled = embeddings_io.make(np.eye(3, dtype=np.float32), keys=list("abc"))
    embeddings_io.write(tmp_path / "u.npz", unlabelled)
    assert evaluate.main(["--embeddings", str(tmp_path / "u.npz")]) == 2
    err = capsys.readouterr().err
    assert "u.npz" in err and "0 labelled images" in err and err.count("\n") == 1


def test_split_restricts_to_held_out_identities(tmp_path, capsys):
    from leopard_jax.data import records

    dataset = tmp_path / "data"
    dataset.mkdir()
    records.save_split(dataset, {"train": ["B", "C"], "test": ["A"]})
    data = layout_embeddings()
    data = embeddings_io.make(
        data.embeddings,
        meta={"dataset": str(dataset)},
        **{f: getattr(data, f) for f in embeddings_io.STRING_FIELDS},
    )
    path = tmp_path / "e.npz"
    embeddings_io.write(path, data)
    assert (
        evaluate.main(["--embeddings", str(path), "--split", "test", "--out", str(tmp_path / "t")])
        == 0
    )
    saved = json.loads((tmp_path / "t" / "metrics.json").read_text())
    # only a1, a2, a3 remain: a1 -> a2 (10) then a3; a2 -> a1 then a3; a3 -> a2 (90) then a1
    assert saved["n_samples"] == 3 and saved["n_queries"] == 3 and saved["split"] == "test"
    assert saved["DT5AP"] == pytest.approx(1.0) and saved["TkRMD"] == pytest.approx([1.0] * 10)
    assert saved["k_ranked"] == 2
    capsys.readouterr()
    assert evaluate.main(["--embeddings", str(path), "--split", "val"]) == 2
    assert "no split 'val'" in capsys.readouterr().err
    assert (
        evaluate.main(["--embeddings", str(path), "--split", "test", "--data", str(tmp_path)]) == 2
    )
    assert "no split.json" in capsys.readouterr().err


def test_help_lists_every_flag_and_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{name}:" in text for name in ("embeddings", "out", "k-max", "split", "data"))
    assert "--[no]ignore-flank:" in text  # a boolean
    assert evaluate.main(["--embeddings", "e.npz", "--k-max", "0"]) == 2
    assert "--k-max" in capsys.readouterr().err
