"""The match store: durable decision log, latest-decision-wins graph, union-find components."""

import concurrent.futures
import itertools
import random

import pytest

from leopard_jax.review import store as store_lib


@pytest.fixture
def store(tmp_path):
    return store_lib.Store(tmp_path / "matches.db")


def test_store_is_wal_with_full_sync(store):
    # synchronous=FULL is 2: each commit is fsync'ed before decide() returns.
    assert store.pragmas() == {"journal_mode": "wal", "synchronous": 2}


def test_latest_decision_per_pair_wins_and_undo_reveals_previous(store):
    store.decide("match", "a", "b")
    late = store.decide("no_match", "b", "a")  # same unordered pair, other direction
    graph = store_lib.build_graph(store.decisions())
    assert graph.links == frozenset() and graph.not_same == {("a", "b")}
    store.undo(late.id)
    graph = store_lib.build_graph(store.decisions())
    assert graph.links == {("a", "b")} and graph.not_same == frozenset()
    assert graph.component("a") == graph.component("b") == "a"


def test_undo_latest_by_default_and_refuses_twice(store):
    first = store.decide("match", "a", "b")
    second = store.decide("reviewed", "a")
    assert store.undo().id == second.id
    assert store.undo().id == first.id
    with pytest.raises(store_lib.StoreError, match="nothing to undo"):
        store.undo()
    with pytest.raises(store_lib.StoreError, match="already undone"):
        store.undo(first.id)
    with pytest.raises(store_lib.StoreError, match="no decision with id 99"):
        store.undo(99)
    # Undone decisions are kept in the log, marked, never deleted.
    assert [d.id for d in store.decisions(active_only=False)] == [first.id, second.id]
    assert all(d.undone for d in store.decisions(active_only=False))


@pytest.mark.parametrize(
    "args, message",
    [
        (("maybe", "a", "b"), "unknown decision"),
        (("match", "a", None), "needs a candidate"),
        (("reviewed", "a", "b"), "takes no candidate"),
        (("match", "a", "a"), "with itself"),
    ],
)
def test_decide_rejects_bad_decisions(store, args, message):
    with pytest.raises(store_lib.StoreError, match=message):
        store.decide(*args)
    assert store.decisions() == []


def _bfs_components(nodes, links):
    """Reference: breadth-first search over an adjacency list."""
    adjacency = {n: set() for n in nodes}
    for a, b in links:
        adjacency[a].add(b)
        adjacency[b].add(a)
    seen, result = set(), {}
    for start in nodes:
        if start in seen:
            continue
        members, frontier = {start}, [start]
        while frontier:
            for nxt in adjacency[frontier.pop()]:
                if nxt not in members:
                    members.add(nxt)
                    frontier.append(nxt)
        seen |= members
        for m in members:
            result[m] = min(members)
    return result


@pytest.mark.parametrize("seed", range(5))
def test_union_find_matches_breadth_first_search(seed):
    rng = random.Random(seed)
    nodes = [f"k{i:02d}" for i in range(30)]
    links = [tuple(rng.sample(nodes, 2)) for _ in range(rng.randint(5, 35))]
    expected = _bfs_components(nodes, links)
    got = store_lib.connected_components(links)
    linked = {n for link in links for n in link}
    assert set(got) == linked
    assert {n: got.get(n, n) for n in nodes} == expected


def test_decisions_survive_reopening(tmp_path):
    path = tmp_path / "m.db"
    store_lib.Store(path).decide("match", "x", "y", 0.5)
    (d,) = store_lib.Store(path).decisions()
    assert (d.kind, d.anchor, d.candidate, d.score) == ("match", "x", "y", 0.5)


def test_concurrent_writers_lose_nothing(store):
    pairs = [(f"a{i}", f"b{j}") for i, j in itertools.product(range(8), range(12))]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda p: store.decide("match", *p).id, pairs))
    assert len(set(ids)) == len(pairs)
    assert sorted((d.anchor, d.candidate) for d in store.decisions()) == sorted(pairs)


def test_conflicts_are_not_same_pairs_inside_one_individual(store):
    store.decide("match", "a", "b")
    store.decide("match", "b", "c")
    store.decide("no_match", "a", "c")
    store.decide("no_match", "a", "d")
    assert store_lib.conflicts(store_lib.build_graph(store.decisions())) == [("a", "c")]


def test_image_catalogue_upserts(store):
    store.register_images([store_lib.ImageRow("k1", "/p1", "/c1", "id", "left", 0)])
    store.register_images(
        [
            store_lib.ImageRow("k1", "/p2", "/c2", "id", "right", 1),
            store_lib.ImageRow("k0", "/p0", "/c0", "", "", 0),
        ]
    )
    assert [(r.key, r.path) for r in store.images()] == [("k0", "/p0"), ("k1", "/p2")]


def test_unusable_store_paths_are_explained(tmp_path):
    with pytest.raises(store_lib.StoreError, match="is a directory"):
        store_lib.Store(tmp_path)
    with pytest.raises(store_lib.StoreError, match="does not exist"):
        store_lib.Store(tmp_path / "missing" / "m.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(store_lib.StoreError, match="junk.db is not a readable match store"):
        store_lib.Store(junk)
