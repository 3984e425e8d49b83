"""The match store: every review decision, durable, and the match graph derived from them.

Decisions are an append-only log in SQLite (WAL journal, synchronous=FULL): a decision is
fsync'ed to disk before `decide` returns, so the page only says "saved" for what would
survive a crash or power cut. WAL lets the page keep reading while another tab writes;
`BEGIN IMMEDIATE` serialises writers, so two tabs deciding at once both land. Undo marks a
decision undone instead of deleting it: nothing a reviewer did is ever erased.

Images are identified by their dataset key (not by row index), so a store stays valid when
the embeddings file is regenerated with more images.

The graph is rebuilt from the log (`build_graph`): for each unordered pair, the latest
active decision wins (match → link, no_match → "not the same"); individuals are the
connected components of the links (union-find).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import pathlib
import sqlite3
from collections.abc import Iterable, Iterator

MATCH = "match"
NO_MATCH = "no_match"
REVIEWED = "reviewed"  # the reviewer finished with this anchor ("next anchor")
KINDS = (MATCH, NO_MATCH, REVIEWED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('match', 'no_match', 'reviewed')),
    anchor TEXT NOT NULL,
    candidate TEXT,
    score REAL,
    created TEXT NOT NULL,
    undone TEXT,
    CHECK ((kind = 'reviewed') = (candidate IS NULL)),
    CHECK (candidate IS NULL OR candidate != anchor)
);
CREATE TABLE IF NOT EXISTS images (
    key TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    crop TEXT NOT NULL,
    identity TEXT NOT NULL,
    flank TEXT NOT NULL,
    position INTEGER NOT NULL
);
"""


class StoreError(ValueError):
    """A request the store refuses (the message says why and what to do)."""


@dataclasses.dataclass(frozen=True)
class Decision:
    id: int
    kind: str
    anchor: str
    candidate: str | None
    score: float | None
    created: str
    undone: str | None


@dataclasses.dataclass(frozen=True)
class ImageRow:
    """What export needs to know about an image without the embeddings file."""

    key: str
    path: str
    crop: str
    identity: str
    flank: str
    position: int


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


class Store:
    """A SQLite file of decisions; every method opens its own connection (thread-safe)."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        if self.path.is_dir():
            raise StoreError(
                f"store {self.path} is a directory; pass a file such as {self.path / 'matches.db'}"
            )
        if not self.path.parent.is_dir():
            raise StoreError(
                f"store {self.path}: folder {self.path.parent} does not exist; create it first"
            )
        try:
            with self._connect() as conn:
                conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise StoreError(
                f"store {self.path} is not a readable match store ({e}); pass another --store path"
            ) from e

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; committed (and fsync'ed) when the block exits."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def pragmas(self) -> dict[str, object]:
        with self._connect() as conn:
            return {
                "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
                "synchronous": conn.execute("PRAGMA synchronous").fetchone()[0],
            }

    def decide(
        self, kind: str, anchor: str, candidate: str | None = None, score: float | None = None
    ) -> Decision:
        """Appends one decision and returns it once it is committed to disk."""
        if kind not in KINDS:
            raise StoreError(f"unknown decision {kind!r}; use one of {', '.join(KINDS)}")
        if (kind == REVIEWED) != (candidate is None):
            raise StoreError(
                f"decision {kind!r} {'takes no' if kind == REVIEWED else 'needs a'} candidate"
            )
        if candidate is not None and candidate == anchor:
            raise StoreError(f"an image cannot be compared with itself ({anchor!r})")
        created = _now()
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO decisions (kind, anchor, candidate, score, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (kind, anchor, candidate, score, created),
            )
            decision_id = cur.lastrowid
        return Decision(decision_id, kind, anchor, candidate, score, created, None)

    def undo(self, decision_id: int | None = None) -> Decision:
        """Marks a decision undone (the latest active one when no id is given)."""
        with self._write() as conn:
            if decision_id is None:
                row = conn.execute(
                    "SELECT * FROM decisions WHERE undone IS NULL ORDER BY id DESC LIMIT 1"
                ).fetchone()
                if row is None:
                    raise StoreError("nothing to undo: there is no active decision")
            else:
                row = conn.execute(
                    "SELECT * FROM decisions WHERE id = ?", (decision_id,)
                ).fetchone()
                if row is None:
                    raise StoreError(f"no decision with id {decision_id}")
                if row[6] is not None:
                    raise StoreError(f"decision {decision_id} was already undone at {row[6]}")
            undone = _now()
            conn.execute("UPDATE decisions SET undone = ? WHERE id = ?", (undone, row[0]))
        return Decision(*row[:6], undone)

    def decisions(self, active_only: bool = True) -> list[Decision]:
        query = (
            "SELECT * FROM decisions"
            + (" WHERE undone IS NULL" if active_only else "")
            + " ORDER BY id"
        )
        with self._connect() as conn:
            return [Decision(*row) for row in conn.execute(query)]

    def register_images(self, rows: Iterable[ImageRow]) -> None:
        """Remembers where each key's images are, so export works from the store alone."""
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO images (key, path, crop, identity, flank, position) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET path = excluded.path, crop = excluded.crop, "
                "identity = excluded.identity, flank = excluded.flank, "
                "position = excluded.position",
                [dataclasses.astuple(r) for r in rows],
            )

    def images(self) -> list[ImageRow]:
        with self._connect() as conn:
            return [
                ImageRow(*row)
                for row in conn.execute("SELECT * FROM images ORDER BY position, key")
            ]


@dataclasses.dataclass(frozen=True)
class MatchGraph:
    """The graph the decisions imply. Keys absent from `root` are alone in their component."""

    links: frozenset[tuple[str, str]]
    not_same: frozenset[tuple[str, str]]
    reviewed: frozenset[str]
    root: dict[str, str]

    def component(self, key: str) -> str:
        return self.root.get(key, key)


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def connected_components(links: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Union-find: maps every linked key to its component's smallest key."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in links:
        ra, rb = find(a), find(b)
        if ra != rb:
            small, large = (ra, rb) if ra < rb else (rb, ra)
            parent[large] = small  # the smallest key stays root: a stable, readable component id
    return {x: find(x) for x in list(parent)}


def build_graph(decisions: Iterable[Decision]) -> MatchGraph:
    """Latest active decision per pair wins; components are taken over the links."""
    state: dict[tuple[str, str], str] = {}
    reviewed = set()
    for d in sorted(decisions, key=lambda d: d.id):
        if d.undone is not None:
            continue
        if d.kind == REVIEWED:
            reviewed.add(d.anchor)
        else:
            state[_pair(d.anchor, d.candidate)] = d.kind
    links = frozenset(p for p, kind in state.items() if kind == MATCH)
    not_same = frozenset(p for p, kind in state.items() if kind == NO_MATCH)
    return MatchGraph(links, not_same, frozenset(reviewed), connected_components(links))


def conflicts(graph: MatchGraph) -> list[tuple[str, str]]:
    """ "Not the same" pairs that the links nevertheless put in one individual."""
    return sorted(p for p in graph.not_same if graph.component(p[0]) == graph.component(p[1]))
