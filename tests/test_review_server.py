"""The review server's JSON API over HTTP: every action, bad requests, traversal, concurrency,
kill -9."""

import concurrent.futures
import http.client
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from leopard_jax.review import candidates as cand_lib
from leopard_jax.review import server as server_lib
from leopard_jax.review import store as store_lib
from leopard_jax.review import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return synthetic.write_synthetic(tmp_path_factory.mktemp("rv"), individuals=3, per_individual=3)


@pytest.fixture(scope="module")
def catalog(npz):
    return cand_lib.load_catalog(npz)


@pytest.fixture
def served(catalog, tmp_path):
    """A fresh store and an in-process server on a free loopback port."""
    store = store_lib.Store(tmp_path / "matches.db")
    server = server_lib.make_server(server_lib.ReviewApp(catalog, store), "127.0.0.1", 0)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    yield server.server_address[1], store
    server.shutdown()
    server.server_close()


def request(port, method, path, body=None, headers=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    if response.getheader("Content-Type", "").startswith("application/json"):
        payload = json.loads(payload)
    return response.status, payload


def ok(port, method, path, body=None):
    status, payload = request(port, method, path, body)
    assert status == 200, payload
    return payload


def test_state_opens_at_first_unreviewed(served, catalog):
    port, _ = served
    state = ok(port, "GET", "/api/state")
    assert state["progress"] == {"reviewed": 0, "total": len(catalog)} and state["current"] == 0
    ok(port, "POST", "/api/next", {"anchor": 0})
    assert ok(port, "GET", "/api/state")["current"] == 1
    assert request(port, "GET", "/api/state", headers={"Host": f"localhost:{port}"})[0] == 200


def test_anchor_view_lists_five_most_similar_first(served, catalog):
    port, _ = served
    view = ok(port, "GET", "/api/anchor/4")
    scores = catalog.embeddings @ catalog.embeddings[4]
    expected = [r for r in np.argsort(-scores, kind="stable") if r != 4][:5]
    assert [c["index"] for c in view["candidates"]] == expected
    np.testing.assert_allclose(
        [c["score"] for c in view["candidates"]], scores[expected], rtol=1e-6
    )
    assert view["anchor"]["key"] == catalog.keys[4] and view["same_individual"] == []


def test_match_is_stored_and_skipped_transitively(served, catalog):
    port, store = served
    view = ok(port, "GET", "/api/anchor/0")
    first, second = view["candidates"][0]["index"], view["candidates"][1]["index"]
    result = ok(port, "POST", "/api/decide", {"anchor": 0, "candidate": first, "decision": "match"})
    assert result["decision"]["kind"] == "match" and result["decision"]["candidate_index"] == first
    (stored,) = store.decisions()
    assert (stored.anchor, stored.candidate) == (catalog.keys[0], catalog.keys[first])
    ok(port, "POST", "/api/decide", {"anchor": first, "candidate": second, "decision": "match"})
    view = ok(port, "GET", "/api/anchor/0")  # `second` is linked to 0 only through `first`
    assert {first, second} == {s["index"] for s in view["same_individual"]}
    assert not {first, second} & {c["index"] for c in view["candidates"]}
    assert len(view["candidates"]) == 5


def test_no_match_is_stored_and_skipped(served):
    port, store = served
    candidate = ok(port, "GET", "/api/anchor/2")["candidates"][0]["index"]
    ok(port, "POST", "/api/decide", {"anchor": 2, "candidate": candidate, "decision": "no_match"})
    assert [d.kind for d in store.decisions()] == ["no_match"]
    assert candidate not in [c["index"] for c in ok(port, "GET", "/api/anchor/2")["candidates"]]


def test_next_anchor_marks_reviewed_and_counts_progress(served, catalog):
    port, _ = served
    result = ok(port, "POST", "/api/next", {"anchor": 1})
    assert result["next"] == 2 and result["progress"]["reviewed"] == 1
    assert ok(port, "GET", "/api/anchor/1")["reviewed"] is True
    for row in range(len(catalog)):
        result = ok(port, "POST", "/api/next", {"anchor": row})
    assert result["next"] is None and result["progress"] == {
        "reviewed": len(catalog),
        "total": len(catalog),
    }
    assert ok(port, "GET", "/api/state")["current"] is None


def test_undo_latest_and_by_id(served):
    port, store = served
    a = ok(port, "POST", "/api/decide", {"anchor": 0, "candidate": 1, "decision": "match"})[
        "decision"
    ]
    b = ok(port, "POST", "/api/decide", {"anchor": 0, "candidate": 2, "decision": "no_match"})[
        "decision"
    ]
    assert ok(port, "POST", "/api/undo", {"id": a["id"]})["undone"]["id"] == a["id"]
    assert [d.id for d in store.decisions()] == [b["id"]]
    status, payload = request(port, "POST", "/api/undo", {"id": a["id"]})
    assert status == 409 and "already undone" in payload["error"]
    undone = ok(port, "POST", "/api/undo", {})["undone"]
    assert (
        undone["id"] == b["id"] and undone["anchor_index"] == 0 and undone["candidate_index"] == 2
    )
    status, payload = request(port, "POST", "/api/undo", {})
    assert status == 409 and "nothing to undo" in payload["error"]


def test_images_are_served_by_index(served, catalog):
    port, _ = served
    for kind, files in (("crop", catalog.crops), ("edge", catalog.edges), ("photo", catalog.paths)):
        status, data = request(port, "GET", f"/image/3/{kind}")
        assert status == 200 and data == pathlib.Path(files[3]).read_bytes()


def test_static_page_is_served(served):
    port, _ = served
    for path, needle in (
        ("/", b"Leopard match review"),
        ("/static/app.js", b"/api/decide"),
        ("/static/style.css", b".card"),
    ):
        status, data = request(port, "GET", path)
        assert status == 200 and needle in data


@pytest.mark.parametrize(
    "method, path, body, raw, headers, status, message",
    [
        (
            "POST",
            "/api/decide",
            None,
            b"{not json",
            {"Content-Type": "application/json"},
            400,
            "JSON object",
        ),
        ("POST", "/api/decide", [1, 2], None, None, 400, "JSON object"),
        (
            "POST",
            "/api/decide",
            {"anchor": 0, "candidate": 1},
            None,
            None,
            400,
            "'decision' must be",
        ),
        (
            "POST",
            "/api/decide",
            {"anchor": 0, "candidate": 1, "decision": "yes"},
            None,
            None,
            400,
            "'decision' must be",
        ),
        (
            "POST",
            "/api/decide",
            {"anchor": 0, "decision": "match"},
            None,
            None,
            400,
            "'candidate' must be",
        ),
        (
            "POST",
            "/api/decide",
            {"anchor": "0", "candidate": 1, "decision": "match"},
            None,
            None,
            400,
            "integer",
        ),
        (
            "POST",
            "/api/decide",
            {"anchor": True, "candidate": 1, "decision": "match"},
            None,
            None,
            400,
            "integer",
        ),
        (
            "POST",
            "/api/decide",
            {"anchor": 0, "candidate": 99, "decision": "match"},
            None,
            None,
            400,
            "out of range",
        ),
        (
            "POST",
            "/api/decide",
            {"anchor": -1, "candidate": 1, "decision": "match"},
            None,
            None,
            400,
            "out of range",
        ),
        (
            "POST",
            "/api/decide",
            {"anchor": 3, "candidate": 3, "decision": "match"},
            None,
            None,
            400,
            "same image",
        ),
        ("POST", "/api/next", {}, None, None, 400, "'anchor' must be"),
        ("POST", "/api/undo", {"id": "x"}, None, None, 400, "'id' must be"),
        ("POST", "/api/undo", {"id": 12345}, None, None, 409, "no decision with id"),
        (
            "POST",
            "/api/decide",
            None,
            b"anchor=0&candidate=1&decision=match",
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
            "application/json",
        ),
        (
            "POST",
            "/api/decide",
            None,
            b"x" * (server_lib.MAX_BODY + 1),
            {"Content-Type": "application/json"},
            413,
            "over",
        ),
        ("GET", "/api/decide", None, None, None, 405, "takes POST"),
        ("DELETE", "/api/state", None, None, None, 405, "not supported"),
        (
            "OPTIONS",
            "/api/decide",
            None,
            None,
            {"Origin": "http://evil.example"},
            405,
            "not supported",
        ),
        ("POST", "/api/state", {}, None, None, 404, "no POST action"),
        ("GET", "/api/anchor/99", None, None, None, 400, "out of range"),
        ("GET", "/api/anchor/x", None, None, None, 404, "no such page"),
        ("GET", "/image/0/thumbnail", None, None, None, 404, "unknown image kind"),
        ("GET", "/api/state", None, None, {"Host": "evil.example:80"}, 403, "loopback"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(
    served, method, path, body, raw, headers, status, message
):
    port, store = served
    got, payload = request(port, method, path, body, headers, raw)
    assert got == status and message in payload["error"]
    assert store.decisions() == []


@pytest.mark.parametrize(
    "path",
    [
        "/image/../../etc/passwd",
        "/image/0/../../../../etc/passwd",
        "/static/../store.py",
        "/static/..%2fstore.py",
        "/static/%2e%2e/server.py",
        "/../leopard_jax/review/store.py",
        "/image/%2e%2e/crop",
        "/image/0/crop/../../../etc/passwd",
        "/image/0/..%2F..%2Fetc%2Fpasswd",
        "//etc/passwd",
        "/etc/passwd",
        "/image/-1/crop",
        "/image/999/crop",
        "/image/1e3/crop",
        "/static/index.html/..",
        "/image/0/%63rop",
        "/static/app.js%00.png",
        "/store.py",
        "/matches.db",
    ],
)
def test_path_traversal_is_refused(served, path):
    port, _ = served
    status, payload = request(port, "GET", path)
    assert 400 <= status < 500 and isinstance(payload, dict) and payload["error"]
    assert b"root:" not in json.dumps(payload).encode()


def test_two_tabs_deciding_at_once_lose_nothing(served, catalog):
    port, store = served
    n = len(catalog)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)][:30]
    jobs = [
        {"anchor": a, "candidate": b, "decision": "match" if (a + b) % 2 else "no_match"}
        for a, b in pairs
    ]
    jobs += [{"anchor": a} for a in range(n)]  # "next anchor" from the other tab at the same time

    def send(body):
        path = "/api/decide" if "decision" in body else "/api/next"
        return request(port, "POST", path, body)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, jobs))
    assert all(status == 200 for status, _ in answers), [p for s, p in answers if s != 200]
    ids = [payload["decision"]["id"] for _, payload in answers]
    assert len(set(ids)) == len(jobs)
    stored = {(d.anchor, d.candidate, d.kind) for d in store.decisions()}
    for body in jobs:
        key = catalog.keys[body["anchor"]]
        if "decision" in body:
            assert (key, catalog.keys[body["candidate"]], body["decision"]) in stored
        else:
            assert (key, None, "reviewed") in stored
    assert ok(port, "GET", "/api/state")["progress"]["reviewed"] == n


def _start_cli(npz, db):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "leopard_jax.review",
            "--embeddings",
            str(npz),
            "--store",
            str(db),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    line = process.stdout.readline()
    assert "http://127.0.0.1:" in line, (
        line,
        process.stderr.read() if process.poll() is not None else "",
    )
    return process, int(line.rsplit(":", 1)[1].strip(" /\n"))


def test_decision_survives_kill_9(npz, tmp_path):
    db = tmp_path / "matches.db"
    process, port = _start_cli(npz, db)
    try:
        answer = ok(port, "POST", "/api/decide", {"anchor": 0, "candidate": 5, "decision": "match"})
        assert answer["decision"]["id"] == 1
    finally:
        os.kill(process.pid, signal.SIGKILL)  # no shutdown, no chance to flush anything
        process.wait(timeout=30)
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    process, port = _start_cli(npz, db)
    try:
        view = ok(port, "GET", "/api/anchor/0")
        assert [s["index"] for s in view["same_individual"]] == [5]
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stdout.close()
        process.stderr.close()


def test_cli_errors_are_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "leopard_jax.review",
            "--embeddings",
            str(tmp_path / "none.npz"),
            "--store",
            str(tmp_path / "m.db"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "none.npz: not found" in result.stderr
