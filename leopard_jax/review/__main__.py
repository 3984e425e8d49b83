"""Serve the match-review page, or export the reviewed individuals.

    python -m leopard_jax.review --embeddings embeddings.npz --store matches.db [--port P]
    python -m leopard_jax.review export --store matches.db --out DIR [--embeddings embeddings.npz]
    python -m leopard_jax.review synthetic --out DIR     # a tiny embeddings.npz to try the page

The first argument picks the command (default: serve); `--help` after it lists its flags.
"""

from __future__ import annotations

import sys

from absl import flags

from leopard_jax import cli, embeddings_io
from leopard_jax.local import calibration as local_calibration
from leopard_jax.local import store as local_store
from leopard_jax.review import candidates as cand_lib
from leopard_jax.review import export as export_lib
from leopard_jax.review import server as server_lib
from leopard_jax.review import store as store_lib
from leopard_jax.review import synthetic

PROG = "python -m leopard_jax.review"
_ERRORS = (
    embeddings_io.EmbeddingsFileError,
    store_lib.StoreError,
    export_lib.ExportError,
    local_calibration.CalibratorError,
    local_store.StoreError,
)

# Each command has its own flags: `export --embeddings` is optional, `serve --embeddings` is not.
SERVE = flags.FlagValues()
_S_EMBEDDINGS = flags.DEFINE_string(
    "embeddings",
    None,
    "embeddings.npz written by leopard_jax.embed",
    flag_values=SERVE,
    required=True,
)
_S_STORE = flags.DEFINE_string(
    "store", None, "SQLite match store (created if missing)", flag_values=SERVE, required=True
)
_S_HOST = flags.DEFINE_string(
    "host",
    "127.0.0.1",
    "address to listen on; only this machine can connect unless you change it",
    flag_values=SERVE,
)
_S_PORT = flags.DEFINE_integer(
    "port", 8765, "port (0 = any free port)", lower_bound=0, flag_values=SERVE
)
_S_CANDIDATES = flags.DEFINE_integer(
    "candidates", 5, "candidates shown per anchor", lower_bound=1, flag_values=SERVE
)
_S_VERBOSE = flags.DEFINE_boolean(
    "verbose", False, "log every request to stderr", flag_values=SERVE
)
_S_CALIBRATOR = flags.DEFINE_string(
    "calibrator",
    None,
    "calibrator JSON from `match --rerank local` (default: calibrator.json in the model dir): "
    "show P(same individual) and the verified spot matches; needs the dataset's feature store",
    flag_values=SERVE,
)

EXPORT = flags.FlagValues()
_E_STORE = flags.DEFINE_string(
    "store",
    None,
    "SQLite match store written by the review page",
    flag_values=EXPORT,
    required=True,
)
_E_OUT = flags.DEFINE_string(
    "out", None, "new (or empty) folder to write", flag_values=EXPORT, required=True
)
_E_EMBEDDINGS = flags.DEFINE_string(
    "embeddings",
    None,
    "embeddings.npz; default: the image list the store remembers",
    flag_values=EXPORT,
)
_E_IMAGE = flags.DEFINE_enum(
    "image", "photo", ["photo", "crop"], "which file to copy", flag_values=EXPORT
)
_E_NO_SINGLETONS = flags.DEFINE_boolean(
    "no-singletons",
    False,
    "leave out images linked to nothing (by default each is its own individual)",
    flag_values=EXPORT,
)

SYNTHETIC = flags.FlagValues()
_Y_OUT = flags.DEFINE_string(
    "out", None, "folder for embeddings.npz and its JPEGs", flag_values=SYNTHETIC, required=True
)
_Y_INDIVIDUALS = flags.DEFINE_integer(
    "individuals", 6, "synthetic individuals", lower_bound=1, flag_values=SYNTHETIC
)
_Y_PER_INDIVIDUAL = flags.DEFINE_integer(
    "per-individual", 4, "images per individual", lower_bound=1, flag_values=SYNTHETIC
)


def _no_positionals(argv: list[str]) -> None:
    if argv:
        raise cli.CommandError(
            f"unexpected arguments {argv}; commands are serve, export, synthetic"
        )


def pair_scorer(embeddings_path: str):
    """A local.pairs.PairScorer when a calibrator for this model is found (else None: the
    page shows cosine similarities); another model's calibrator is refused."""
    import pathlib

    from leopard_jax.local import pairs

    data = embeddings_io.read(embeddings_path)
    given = _S_CALIBRATOR.value
    path = (
        pathlib.Path(given) if given else local_calibration.default_path(data.meta, embeddings_path)
    )
    if not given and not path.is_file():
        return None
    calibrator = local_calibration.load(path, str(data.meta.get("model_fingerprint", "")))
    return pairs.for_embeddings(data, calibrator)


def serve(argv: list[str]) -> int:
    """Serve the match-review page (the default command)."""
    _no_positionals(argv)
    host, port = _S_HOST.value, _S_PORT.value
    catalog = cand_lib.load_catalog(_S_EMBEDDINGS.value)
    store = store_lib.Store(_S_STORE.value)
    store.register_images(catalog.image_rows())
    app = server_lib.ReviewApp(
        catalog, store, k=_S_CANDIDATES.value, scorer=pair_scorer(_S_EMBEDDINGS.value)
    )
    try:
        server = server_lib.make_server(app, host, port, quiet=not _S_VERBOSE.value)
    except OSError as e:
        raise cli.CommandError(
            f"cannot listen on {host}:{port} ({e.strerror}); pass another --port"
        ) from e
    if not server_lib.is_loopback(host):
        print(
            f"review: listening on {host}: anyone who can reach this machine can read the images "
            "and record decisions",
            file=sys.stderr,
        )
    print(
        f"review: {len(catalog)} images, store {store.path}; open {server_lib.server_url(server)}",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def export(argv: list[str]) -> int:
    """Write one folder per individual (connected component of confirmed matches) and
    individuals.csv."""
    _no_positionals(argv)
    store = store_lib.Store(_E_STORE.value)
    rows = cand_lib.load_catalog(_E_EMBEDDINGS.value).image_rows() if _E_EMBEDDINGS.value else None
    s = export_lib.export_individuals(
        store, _E_OUT.value, rows, _E_IMAGE.value, not _E_NO_SINGLETONS.value
    )
    print(f"export: {s.individuals} individuals, {s.images} images ({s.copied} copied) -> {s.out}")
    return 0


def make_synthetic(argv: list[str]) -> int:
    """Write a small synthetic embeddings.npz with JPEGs to try the page."""
    _no_positionals(argv)
    print(synthetic.write_synthetic(_Y_OUT.value, _Y_INDIVIDUALS.value, _Y_PER_INDIVIDUAL.value))
    return 0


COMMANDS = {
    "serve": (SERVE, serve),
    "export": (EXPORT, export),
    "synthetic": (SYNTHETIC, make_synthetic),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and argv[0] in COMMANDS else "serve"
    flag_values, body = COMMANDS[name]
    doc = f"{__doc__.strip()}\n\n{name}: {body.__doc__}"
    return cli.run(flag_values, body, argv, errors=_ERRORS, prog=f"{PROG} {name}", doc=doc)


if __name__ == "__main__":
    sys.exit(main())
