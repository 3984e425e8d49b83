"""Export: one folder per connected component, files copied intact, CSV a partition of images."""

import csv
import pathlib

import pytest

from leopard_jax.review import __main__ as cli
from leopard_jax.review import candidates as cand_lib
from leopard_jax.review import export as export_lib
from leopard_jax.review import store as store_lib
from leopard_jax.review import synthetic


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return cand_lib.load_catalog(
        synthetic.write_synthetic(tmp_path_factory.mktemp("ex"), individuals=3, per_individual=3)
    )


@pytest.fixture
def store(tmp_path, catalog):
    """Images 0-1-2 linked in a chain, 3-4 linked, 5 a no-match; 6, 7, 8 untouched."""
    store = store_lib.Store(tmp_path / "m.db")
    k = catalog.keys
    store.decide("match", k[0], k[1])
    store.decide("match", k[2], k[1])
    store.decide("match", k[3], k[4])
    store.decide("no_match", k[0], k[5])
    store.decide("reviewed", k[0])
    undone = store.decide("match", k[0], k[8])
    store.undo(undone.id)
    store.register_images(catalog.image_rows())
    return store


def _read_csv(out):
    with open(out / export_lib.CSV_NAME, newline="") as f:
        return list(csv.DictReader(f))


def test_folders_follow_components_and_files_are_intact(store, catalog, tmp_path):
    out = tmp_path / "export"
    summary = export_lib.export_individuals(store, out)
    rows = _read_csv(out)
    by_individual = {}
    for row in rows:
        by_individual.setdefault(row["identity"], set()).add(catalog.index[row["key"]])
        exported = out / row["file"]
        assert exported.read_bytes() == pathlib.Path(row["path"]).read_bytes()
        assert exported.parent.name == row["identity"]
    groups = sorted(map(sorted, by_individual.values()))
    assert groups == [[0, 1, 2], [3, 4], [5], [6], [7], [8]]  # the undone 0-8 link is not there
    assert summary.individuals == 6 and summary.images == summary.copied == len(catalog)
    assert sorted(p.name for p in out.iterdir()) == sorted(by_individual) + [export_lib.CSV_NAME]
    assert {r["key"]: r["reviewed"] for r in rows}[catalog.keys[0]] == "1"
    assert {r["key"]: r["label"] for r in rows} == dict(zip(catalog.keys, catalog.identities))
    assert not (out.parent / ".export.partial").exists()


def test_without_singletons_and_with_crops(store, catalog, tmp_path):
    out = tmp_path / "export"
    summary = export_lib.export_individuals(store, out, image="crop", singletons=False)
    rows = _read_csv(out)
    assert summary.individuals == 2 and sorted(catalog.index[r["key"]] for r in rows) == [
        0,
        1,
        2,
        3,
        4,
    ]
    for row in rows:
        assert (out / row["file"]).read_bytes() == pathlib.Path(
            catalog.crops[catalog.index[row["key"]]]
        ).read_bytes()


def test_conflicts_are_written_beside_the_csv(store, catalog, tmp_path):
    store.decide("no_match", catalog.keys[0], catalog.keys[2])  # but 0-1-2 are linked
    summary = export_lib.export_individuals(store, tmp_path / "export")
    assert summary.conflicts == ((catalog.keys[0], catalog.keys[2]),)
    text = (tmp_path / "export" / export_lib.CONFLICTS_NAME).read_text()
    assert catalog.keys[0] in text and catalog.keys[2] in text


def test_missing_image_files_are_listed_without_a_file(store, catalog, tmp_path):
    rows = catalog.image_rows()
    rows[4] = store_lib.ImageRow(rows[4].key, str(tmp_path / "gone.jpg"), "", "", "", 4)
    summary = export_lib.export_individuals(store, tmp_path / "export", rows=rows)
    assert summary.missing == (catalog.keys[4],) and summary.copied == len(catalog) - 1
    assert {r["key"]: r["file"] for r in _read_csv(tmp_path / "export")}[catalog.keys[4]] == ""


def test_refuses_to_overwrite_or_export_nothing(store, catalog, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(export_lib.ExportError, match="not empty"):
        export_lib.export_individuals(store, out)
    assert (out / "keep.txt").read_text() == "mine"
    empty = store_lib.Store(tmp_path / "empty.db")
    with pytest.raises(export_lib.ExportError, match="pass --embeddings"):
        export_lib.export_individuals(empty, tmp_path / "e2")


def test_cli_export_with_and_without_embeddings(store, catalog, tmp_path, capsys):
    npz = pathlib.Path(catalog.crops[0]).parents[1] / "embeddings.npz"
    fresh = store_lib.Store(tmp_path / "fresh.db")  # knows no images: needs --embeddings
    fresh.decide("match", catalog.keys[6], catalog.keys[7])
    assert (
        cli.main(
            [
                "export",
                "--store",
                str(fresh.path),
                "--out",
                str(tmp_path / "a"),
                "--embeddings",
                str(npz),
                "--no-singletons",
            ]
        )
        == 0
    )
    assert sorted(r["key"] for r in _read_csv(tmp_path / "a")) == [catalog.keys[6], catalog.keys[7]]
    assert cli.main(["export", "--store", str(store.path), "--out", str(tmp_path / "b")]) == 0
    assert "6 individuals, 9 images" in capsys.readouterr().out
    assert cli.main(["export", "--store", str(fresh.path), "--out", str(tmp_path / "c")]) == 2
    assert "pass --embeddings" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, names",
    [
        (
            [],
            ("embeddings", "store", "host", "port", "candidates", "verbose"),
        ),  # serve, the default
        (["export"], ("store", "out", "embeddings", "image", "no-singletons")),
        (["synthetic"], ("out", "individuals", "per-individual")),
    ],
)
def test_cli_help_lists_every_flag_of_each_command(capsys, command, names):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(
        f"--{name}:" in text or f"--[no]{name}:" in text for name in names
    )  # [no]: a boolean


def test_cli_synthetic_writes_a_readable_file(tmp_path, capsys):
    assert (
        cli.main(
            ["synthetic", "--out", str(tmp_path), "--individuals", "2", "--per-individual", "2"]
        )
        == 0
    )
    assert len(cand_lib.load_catalog(capsys.readouterr().out.strip())) == 4
    assert (
        cli.main(
            ["export", "--store", str(tmp_path / "m.db"), "--out", str(tmp_path / "x"), "stray"]
        )
        == 2
    )
    assert "unexpected arguments ['stray']" in capsys.readouterr().err
