"""Command line: serve the review page, or export the reviewed individuals.

    python -m leopard_jax.review --embeddings embeddings.npz --store matches.db [--port P] [--host H]
    python -m leopard_jax.review export --store matches.db --out DIR [--embeddings embeddings.npz]
    python -m leopard_jax.review synthetic --out DIR     # a tiny embeddings.npz to try the page
"""

from __future__ import annotations

import argparse
import sys

from leopard_jax.review import candidates as cand_lib
from leopard_jax.review import export as export_lib
from leopard_jax.review import server as server_lib
from leopard_jax.review import store as store_lib
from leopard_jax.review import synthetic

_ERRORS = (cand_lib.CatalogError, store_lib.StoreError, export_lib.ExportError)


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m leopard_jax.review",
        description="Serve the match-review page. Other commands: `export` (folders per individual), "
                    "`synthetic` (demo data); add --help after one for its options.")
    p.add_argument("--embeddings", required=True, help="embeddings.npz written by leopard_jax.embed")
    p.add_argument("--store", required=True, help="SQLite match store (created if missing)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; only this machine can connect unless you change it")
    p.add_argument("--port", type=int, default=8765, help="port (0 = any free port)")
    p.add_argument("--candidates", type=int, default=5, help="candidates shown per anchor")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m leopard_jax.review export",
                                description="Write one folder per individual (connected component of "
                                            "confirmed matches) and individuals.csv.")
    p.add_argument("--store", required=True, help="SQLite match store written by the review page")
    p.add_argument("--out", required=True, help="new (or empty) folder to write")
    p.add_argument("--embeddings", help="embeddings.npz; default: the image list the store remembers")
    p.add_argument("--image", choices=("photo", "crop"), default="photo", help="which file to copy")
    p.add_argument("--no-singletons", action="store_true",
                   help="leave out images linked to nothing (by default each is its own individual)")
    return p


def _synthetic_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m leopard_jax.review synthetic",
                                description="Write a small synthetic embeddings.npz with JPEGs to try the page.")
    p.add_argument("--out", required=True)
    p.add_argument("--individuals", type=int, default=6)
    p.add_argument("--per-individual", type=int, default=4)
    return p


def serve(argv: list[str]) -> int:
    args = _serve_parser().parse_args(argv)
    catalog = cand_lib.load_catalog(args.embeddings)
    store = store_lib.Store(args.store)
    store.register_images(catalog.image_rows())
    app = server_lib.ReviewApp(catalog, store, k=args.candidates)
    try:
        server = server_lib.make_server(app, args.host, args.port, quiet=not args.verbose)
    except OSError as e:
        print(f"review: cannot listen on {args.host}:{args.port} ({e.strerror}); pass another --port",
              file=sys.stderr)
        return 2
    if not server_lib.is_loopback(args.host):
        print(f"review: listening on {args.host}: anyone who can reach this machine can read the images "
              "and record decisions", file=sys.stderr)
    print(f"review: {len(catalog)} images, store {store.path}; open {server_lib.server_url(server)}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    store = store_lib.Store(args.store)
    rows = cand_lib.load_catalog(args.embeddings).image_rows() if args.embeddings else None
    s = export_lib.export_individuals(store, args.out, rows, args.image, not args.no_singletons)
    print(f"export: {s.individuals} individuals, {s.images} images ({s.copied} copied) -> {s.out}")
    return 0


def make_synthetic(argv: list[str]) -> int:
    args = _synthetic_parser().parse_args(argv)
    print(synthetic.write_synthetic(args.out, args.individuals, args.per_individual))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"export": export, "synthetic": make_synthetic, "serve": serve}
    command = commands.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else serve(argv)
    except _ERRORS as e:
        print(f"review: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
