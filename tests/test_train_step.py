"""The pmapped step's inputs: replicated state must look like the step's own outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import jax_utils

from leopard_jax import train_step as ts


def _count_backend_compiles(fn) -> int:
    events = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event.endswith("backend_compile_duration"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


def test_replicated_state_needs_no_second_compile_of_the_step():
    """flax's replicate lays arrays out differently from pmap's outputs, which made the
    training step compile twice (~20 s each for the demo model on CPU)."""
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.zeros((), jnp.int32)}
    step = jax.pmap(lambda s, x: jax.tree.map(lambda a: a + x.astype(a.dtype), s), axis_name=ts.AXIS, donate_argnums=0)
    x = jax_utils.replicate(np.float32(1.0))

    replicated = ts.replicate(state)
    layouts = [leaf.sharding for leaf in jax.tree.leaves(replicated)]
    first = step(replicated, x)  # compiles
    assert layouts == [leaf.sharding for leaf in jax.tree.leaves(first)]
    result = {}
    assert _count_backend_compiles(lambda: result.update(out=jax.block_until_ready(step(first, x)))) == 0
    np.testing.assert_array_equal(jax_utils.unreplicate(result["out"])["w"], np.arange(6.0).reshape(2, 3) + 2)

    # the old way: the first call compiles for one layout, the second for pmap's own
    old = jax.pmap(lambda s, x: jax.tree.map(lambda a: a * x.astype(a.dtype), s), axis_name=ts.AXIS, donate_argnums=0)
    first = old(jax_utils.replicate(state), x)
    assert _count_backend_compiles(lambda: jax.block_until_ready(old(first, x))) == 1
