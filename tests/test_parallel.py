"""leopard_jax.parallel: the one pmap wiring (replicate / shard / unshard / unreplicate)."""

import time

import jax
import numpy as np
import pytest

from leopard_jax import parallel


def test_replicate_then_unreplicate_round_trips_a_pytree():
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(7)}
    replicated = parallel.replicate(tree)
    n = jax.local_device_count()
    assert replicated["w"].shape == (n, 2, 3) and replicated["step"].shape == (n,)
    back = parallel.unreplicate(replicated)
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert back["step"] == 7 and isinstance(back["w"], np.ndarray)


def test_unreplicated_arrays_own_their_memory_and_outlive_a_donating_step():
    """Host copies, not views of the device buffer: the next donating step neither changes
    them nor has to copy a buffer they still hold."""
    replicated = parallel.replicate({"w": np.arange(6, dtype=np.float32)})
    back = parallel.unreplicate(replicated)
    assert back["w"].flags["OWNDATA"] and back["w"].flags["WRITEABLE"]
    step = jax.pmap(lambda t: jax.tree.map(lambda a: a * 0, t), donate_argnums=0)
    jax.block_until_ready(step(replicated))
    np.testing.assert_array_equal(back["w"], np.arange(6, dtype=np.float32))


def test_replicated_layout_is_what_a_pmapped_step_returns():
    """The step must not compile twice: its second call sees its own output's layout."""
    replicated = parallel.replicate({"x": np.ones(3, np.float32)})
    out = jax.pmap(lambda t: jax.tree.map(lambda a: a + 1, t), axis_name=parallel.AXIS)(replicated)
    assert [a.sharding for a in jax.tree.leaves(out)] == [
        a.sharding for a in jax.tree.leaves(replicated)
    ]


def test_shard_splits_the_batch_per_device_and_unshard_inverts_it():
    batch = {"image": np.arange(24, dtype=np.uint8).reshape(4, 3, 2), "label": np.arange(4)}
    sharded = parallel.shard(batch, num_devices=2)
    assert sharded["image"].shape == (2, 2, 3, 2) and sharded["label"].tolist() == [[0, 1], [2, 3]]
    back = parallel.unshard(sharded)
    np.testing.assert_array_equal(back["image"], batch["image"])
    np.testing.assert_array_equal(back["label"], batch["label"])


def test_shard_refuses_a_batch_that_does_not_divide():
    with pytest.raises(ValueError, match="does not split over 3 devices"):
        parallel.shard({"x": np.zeros((4, 2))}, num_devices=3)


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_prefetch_to_device_yields_the_sharded_batches_reading_size_ahead():
    taken = []

    def batches():
        for i in range(5):
            taken.append(i)
            yield {"x": np.full((2 * jax.local_device_count(), 3), i, np.float32)}

    with parallel.prefetch_to_device(batches(), size=2) as stream:
        first = next(stream)
        _wait_for(lambda: len(taken) >= 3)
        time.sleep(0.2)
        assert taken == [0, 1, 2]  # the batch handed over and the next `size`, no more
        expected = parallel.shard({"x": np.zeros((2 * jax.local_device_count(), 3), np.float32)})
        np.testing.assert_array_equal(np.asarray(first["x"]), expected["x"])
        second = next(stream)
        _wait_for(lambda: len(taken) >= 4)
        rest = [second, *stream]
        assert [int(np.asarray(b["x"])[0, 0, 0]) for b in rest] == [1, 2, 3, 4]
        step = jax.pmap(lambda t: t["x"] + 1, axis_name=parallel.AXIS)
        assert step(first).sharding == first["x"].sharding  # laid out as pmap lays out its own
    with pytest.raises(ValueError, match="prefetch size"):
        parallel.prefetch_to_device(batches(), size=0)


def test_prefetch_hands_a_reading_error_to_the_consumer_and_close_stops_the_thread():
    def failing():
        yield {"x": np.zeros((jax.local_device_count(), 1), np.float32)}
        raise OSError("corrupt record 7")

    stream = parallel.prefetch_to_device(failing(), size=2)
    next(stream)
    with pytest.raises(OSError, match="corrupt record 7"):
        next(stream)

    endless = parallel.prefetch_to_device(
        ({"x": np.zeros((jax.local_device_count(), 1), np.float32)} for _ in iter(int, 1)), size=2
    )
    next(endless)
    endless.close()
    assert not endless._thread.is_alive()
    with pytest.raises(StopIteration):
        next(endless)


def test_peek_returns_the_next_batch_without_handing_it_over():
    def batches():
        for i in range(3):
            yield {"x": np.full((jax.local_device_count(), 1), i, np.float32)}

    with parallel.prefetch_to_device(batches(), size=1) as stream:
        peeked = stream.peek()
        assert stream.peek() is peeked  # still not handed over
        assert next(stream) is peeked
        assert [int(np.asarray(b["x"]).flat[0]) for b in stream] == [1, 2]
        with pytest.raises(StopIteration):
            stream.peek()


def test_compile_ahead_runs_as_the_pmap_compiles_once_and_clears_the_traces():
    """The compiled step gives the pmap's results, takes its own (donated) output without
    compiling again, and JAX's caches are empty after it: a function traced before traces
    again (what frees the step's jaxprs and lowering)."""
    traces = []

    @jax.jit
    def traced_before(x):
        traces.append(1)
        return x * 2

    traced_before(np.float32(1))
    traced_before(np.float32(2))
    assert len(traces) == 1

    def step(state, batch):
        new = jax.tree.map(lambda a: a + batch["x"].sum(), state)
        return new, jax.lax.pmean(batch["x"].mean(), parallel.AXIS)

    pmapped = jax.pmap(step, axis_name=parallel.AXIS, donate_argnums=(0,))
    n = jax.local_device_count()
    batch = parallel.put_sharded({"x": np.arange(2 * n, dtype=np.float32)})
    expected = jax.device_get(pmapped(parallel.replicate({"w": np.ones(3, np.float32)}), batch))
    state = parallel.replicate({"w": np.ones(3, np.float32)})
    compiled = parallel.compile_ahead(pmapped, state, batch)
    out = compiled(state, batch)
    np.testing.assert_array_equal(jax.device_get(out[0])["w"], expected[0]["w"])
    np.testing.assert_array_equal(jax.device_get(out[1]), expected[1])
    compiles = []

    def listener(event, duration_s, **_):
        if event.endswith("backend_compile_duration"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(compiled(out[0], batch))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    traced_before(np.float32(3))
    assert len(traces) == 2
