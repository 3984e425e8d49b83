"""The review page's HTTP server: a JSON API over the store plus one static page.

Standard library only (http.server): the page needs a handful of routes, and a framework
would be one more dependency to install on a field laptop. Safety by construction: images
are addressed by row index into the embeddings file and the static files by a fixed table,
so no client-supplied text ever becomes a filesystem path. POSTs must be JSON (a cross-site
form cannot send that without a CORS preflight we never grant) and, when listening on
loopback, the Host header must be a loopback name (defeats DNS rebinding).
"""

from __future__ import annotations

import dataclasses
import http.server
import ipaddress
import json
import mimetypes
import pathlib
import re
import socket
import urllib.parse

from leopard_jax.review import candidates as cand_lib
from leopard_jax.review import store as store_lib

STATIC_DIR = pathlib.Path(__file__).resolve().parent / "static"
STATIC_FILES = {  # URL path -> (file in STATIC_DIR, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
IMAGE_KINDS = ("crop", "edge", "photo")
MAX_BODY = 16 * 1024
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_IMAGE_ROUTE = re.compile(r"^/image/(\d{1,9})/([a-z]+)$")
_ANCHOR_ROUTE = re.compile(r"^/api/anchor/(\d{1,9})$")
_PAIR_ROUTE = re.compile(r"^/pair/(\d{1,9})/(\d{1,9})$")


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    cache: str = "no-store"


def _json(payload, status: int = 200) -> Response:
    return Response(status, json.dumps(payload).encode())


class ReviewApp:
    """Maps requests to answers; holds no state beyond the catalog and the store file."""

    def __init__(self, catalog: cand_lib.Catalog, store: store_lib.Store, k: int = 5, scorer=None):
        """scorer: a `local.pairs.PairScorer`; with one, candidates show the fused
        P(same individual) and their verified correspondences instead of the cosine."""
        self.catalog = catalog
        self.store = store
        self.k = k
        self.scorer = scorer

    # -- helpers --------------------------------------------------------------------------
    def _graph(self) -> store_lib.MatchGraph:
        return store_lib.build_graph(self.store.decisions())

    def _row(self, value, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HttpError(400, f"'{field}' must be an image index (integer), got {value!r}")
        if not 0 <= value < len(self.catalog):
            raise HttpError(
                400, f"'{field}' {value} is out of range; images are 0..{len(self.catalog) - 1}"
            )
        return value

    def _image(self, row: int, score: float | None = None, anchor: int | None = None) -> dict:
        c = self.catalog
        out = {
            "index": row,
            "key": c.keys[row],
            "identity": c.identities[row],
            "flank": c.flanks[row],
            "score": score,
            "probability": None,
            "crop_url": f"/image/{row}/crop",
            "edge_url": f"/image/{row}/edge" if c.edges[row] else None,
        }
        if self.scorer is not None and anchor is not None:
            probability, found = self.scorer.score(anchor, row)
            out |= {
                "probability": probability,
                "inliers": found.inliers,
                "pair_url": f"/pair/{anchor}/{row}",
            }
        return out

    def _progress(self, graph: store_lib.MatchGraph) -> dict:
        reviewed = sum(key in graph.reviewed for key in self.catalog.keys)
        return {"reviewed": reviewed, "total": len(self.catalog)}

    def _decision(self, d: store_lib.Decision) -> dict:
        out = dataclasses.asdict(d)
        out["anchor_index"] = self.catalog.index.get(d.anchor)
        out["candidate_index"] = self.catalog.index.get(d.candidate) if d.candidate else None
        return out

    def _score(self, a: int, b: int) -> float:
        return float(self.catalog.embeddings[a] @ self.catalog.embeddings[b])

    # -- routes ---------------------------------------------------------------------------
    def state(self) -> dict:
        graph = self._graph()
        return {
            "progress": self._progress(graph),
            "current": cand_lib.next_unreviewed(self.catalog, graph),
            "links": len(graph.links),
            "not_same": len(graph.not_same),
            "conflicts": [list(p) for p in store_lib.conflicts(graph)],
            "k": self.k,
            "meta": self.catalog.meta,
        }

    def anchor_view(self, row: int) -> dict:
        graph = self._graph()
        return {
            "anchor": self._image(row),
            "candidates": [
                self._image(r, s, anchor=row)
                for r, s in cand_lib.top_candidates(self.catalog, graph, row, self.k)
            ],
            "same_individual": [
                self._image(r, s) for r, s in cand_lib.same_individual(self.catalog, graph, row)
            ],
            "reviewed": self.catalog.keys[row] in graph.reviewed,
            "progress": self._progress(graph),
        }

    def decide(self, body: dict) -> dict:
        kind = body.get("decision")
        if kind not in (store_lib.MATCH, store_lib.NO_MATCH):
            raise HttpError(400, f"'decision' must be 'match' or 'no_match', got {kind!r}")
        anchor, candidate = (
            self._row(body.get("anchor"), "anchor"),
            self._row(body.get("candidate"), "candidate"),
        )
        if anchor == candidate:
            raise HttpError(400, f"anchor and candidate are the same image ({anchor})")
        d = self.store.decide(
            kind,
            self.catalog.keys[anchor],
            self.catalog.keys[candidate],
            self._score(anchor, candidate),
        )
        return {"decision": self._decision(d), "progress": self._progress(self._graph())}

    def next_anchor(self, body: dict) -> dict:
        anchor = self._row(body.get("anchor"), "anchor")
        d = self.store.decide(store_lib.REVIEWED, self.catalog.keys[anchor])
        graph = self._graph()
        return {
            "decision": self._decision(d),
            "next": cand_lib.next_unreviewed(self.catalog, graph, anchor),
            "progress": self._progress(graph),
        }

    def undo(self, body: dict) -> dict:
        decision_id = body.get("id")
        if decision_id is not None and (
            isinstance(decision_id, bool) or not isinstance(decision_id, int)
        ):
            raise HttpError(
                400, f"'id' must be a decision id (integer) or absent, got {decision_id!r}"
            )
        try:
            d = self.store.undo(decision_id)
        except store_lib.StoreError as e:
            raise HttpError(409, str(e)) from e
        return {"undone": self._decision(d), "progress": self._progress(self._graph())}

    def image(self, row: int, kind: str) -> Response:
        if kind not in IMAGE_KINDS:
            raise HttpError(
                404, f"unknown image kind {kind!r}; use one of {', '.join(IMAGE_KINDS)}"
            )
        if not 0 <= row < len(self.catalog):
            raise HttpError(404, f"no image {row}; images are 0..{len(self.catalog) - 1}")
        c = self.catalog
        path = {"crop": c.crops[row] or c.paths[row], "edge": c.edges[row], "photo": c.paths[row]}[
            kind
        ]
        if not path:
            raise HttpError(404, f"image {row} has no {kind} file in the embeddings file")
        try:
            data = pathlib.Path(path).read_bytes()
        except OSError:
            raise HttpError(404, f"the {kind} file of image {row} cannot be read: {path}") from None
        ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return Response(200, data, ctype, cache="private, max-age=300")

    def pair(self, a: int, b: int) -> Response:
        """PNG: the two crops side by side, the verified correspondences drawn between."""
        import cv2

        from leopard_jax.local import pairs

        if self.scorer is None:
            raise HttpError(404, "no local features: start the review with a feature store")
        for row in (a, b):
            if not 0 <= row < len(self.catalog):
                raise HttpError(404, f"no image {row}; images are 0..{len(self.catalog) - 1}")
        crops = [cv2.imread(self.catalog.crops[r] or self.catalog.paths[r]) for r in (a, b)]
        if any(c is None for c in crops):
            raise HttpError(404, f"the crop of image {a} or {b} cannot be read")
        ok, png = cv2.imencode(".png", pairs.draw(*crops, self.scorer.score(a, b)[1]))
        return Response(200, png.tobytes(), "image/png", cache="private, max-age=300")

    # -- dispatch -------------------------------------------------------------------------
    def handle(self, method: str, raw_path: str, body: bytes | None) -> Response:
        try:
            return self._dispatch(method, raw_path, body)
        except HttpError as e:
            return _json({"error": e.message}, e.status)
        except store_lib.StoreError as e:
            return _json({"error": str(e)}, 400)

    def _dispatch(self, method: str, raw_path: str, body: bytes | None) -> Response:
        path = urllib.parse.urlsplit(raw_path).path
        if method == "GET":
            if path in STATIC_FILES:
                name, ctype = STATIC_FILES[path]
                return Response(200, (STATIC_DIR / name).read_bytes(), ctype)
            if path == "/api/state":
                return _json(self.state())
            if m := _ANCHOR_ROUTE.match(path):
                return _json(self.anchor_view(self._row(int(m.group(1)), "anchor")))
            if m := _IMAGE_ROUTE.match(path):
                return self.image(int(m.group(1)), m.group(2))
            if m := _PAIR_ROUTE.match(path):
                return self.pair(int(m.group(1)), int(m.group(2)))
            if path in ("/api/decide", "/api/next", "/api/undo"):
                raise HttpError(405, f"{path} takes POST")
            raise HttpError(404, f"no such page: {path[:200]}")
        if method == "POST":
            actions = {
                "/api/decide": self.decide,
                "/api/next": self.next_anchor,
                "/api/undo": self.undo,
            }
            if path not in actions:
                raise HttpError(
                    404 if path not in STATIC_FILES else 405, f"no POST action at {path[:200]}"
                )
            return _json(actions[path](_parse_json(body)))
        raise HttpError(405, f"method {method} is not supported")


def _parse_json(body: bytes | None) -> dict:
    try:
        payload = json.loads(body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HttpError(400, f"request body must be a JSON object ({e})") from None
    if not isinstance(payload, dict):
        raise HttpError(400, "request body must be a JSON object")
    return payload


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "leopard-review/1"
    app: ReviewApp  # set on the subclass made by make_server
    check_host: bool
    quiet: bool

    def log_message(self, fmt, *args):
        if not self.quiet:
            super().log_message(fmt, *args)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", response.cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header(
            "Content-Security-Policy", "default-src 'self'; img-src 'self'; frame-ancestors 'none'"
        )
        self.end_headers()
        self.wfile.write(response.body)

    def _refuse(self) -> Response | None:
        if self.check_host:
            host = (self.headers.get("Host") or "").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in LOOPBACK_NAMES:
                return _json(
                    {"error": f"Host {host!r} refused: this server answers only on loopback"}, 403
                )
        return None

    def do_GET(self):
        self._send(self._refuse() or self.app.handle("GET", self.path, None))

    def do_POST(self):
        if refusal := self._refuse():
            return self._send(refusal)
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return self._send(
                _json({"error": "POST bodies must be sent as Content-Type: application/json"}, 415)
            )
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._send(_json({"error": "bad Content-Length"}, 400))
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            return self._send(_json({"error": f"request body over {MAX_BODY} bytes"}, 413))
        self._send(self.app.handle("POST", self.path, self.rfile.read(length)))

    def _not_allowed(self):
        self._send(_json({"error": f"method {self.command} is not supported"}, 405))

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # OPTIONS: no CORS, ever


def make_server(
    app: ReviewApp, host: str = "127.0.0.1", port: int = 0, quiet: bool = True
) -> http.server.ThreadingHTTPServer:
    """A threaded server (one thread per request: tabs never wait on each other's reads)."""
    handler = type(
        "ReviewHandler", (_Handler,), {"app": app, "check_host": is_loopback(host), "quiet": quiet}
    )
    server_cls = http.server.ThreadingHTTPServer
    if ":" in host:
        server_cls = type("ReviewServer6", (server_cls,), {"address_family": socket.AF_INET6})
    server = server_cls((host, port), handler)
    server.daemon_threads = True
    return server


def server_url(server: http.server.ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/"
