"""The training step's pieces: replicated inputs laid out like the step's own outputs, and
the loss looked up by config name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import jax_utils

from leopard_jax import losses, parallel
from leopard_jax.train import steps


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
    step = jax.pmap(
        lambda s, x: jax.tree.map(lambda a: a + x.astype(a.dtype), s),
        axis_name=parallel.AXIS,
        donate_argnums=0,
    )
    x = jax_utils.replicate(np.float32(1.0))

    replicated = parallel.replicate(state)
    layouts = [leaf.sharding for leaf in jax.tree.leaves(replicated)]
    first = step(replicated, x)  # compiles
    assert layouts == [leaf.sharding for leaf in jax.tree.leaves(first)]
    result = {}
    assert (
        _count_backend_compiles(lambda: result.update(out=jax.block_until_ready(step(first, x))))
        == 0
    )
    np.testing.assert_array_equal(
        jax_utils.unreplicate(result["out"])["w"], np.arange(6.0).reshape(2, 3) + 2
    )

    # the old way: the first call compiles for one layout, the second for pmap's own
    old = jax.pmap(
        lambda s, x: jax.tree.map(lambda a: a * x.astype(a.dtype), s),
        axis_name=parallel.AXIS,
        donate_argnums=0,
    )
    first = old(jax_utils.replicate(state), x)
    assert _count_backend_compiles(lambda: jax.block_until_ready(old(first, x))) == 1


def test_compute_loss_uses_the_configured_loss_and_margin_function():
    """config.loss.name picks the loss from losses.LOSSES; margin_fn names any of
    losses.MARGIN_FUNCTIONS, spotid_code included."""
    import ml_collections

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6, 4)).astype(np.float32)
    centers = rng.normal(size=(3, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, -1, 1], np.int32)
    key, epoch = jax.random.PRNGKey(0), np.int32(5)
    config = ml_collections.ConfigDict(
        dict(
            name="cosface",
            scale=16.0,
            margin=0.3,
            margin_fn="spotid_code",
            triplet_margin=0.2,
            triplet_warmup_epochs=3,
        )
    )
    loss, used = steps.compute_loss(config, emb, centers, labels, key, epoch)
    expected, _ = losses.cosface_loss(
        emb, centers, labels, scale=16.0, margin=0.3, margin_fn=losses.spotid_code_margin
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(used) == 5.0
    config.name = "triplet"
    loss, used = steps.compute_loss(config, emb, centers, labels, key, epoch)
    expected, aux = losses.triplet_loss(emb, labels, key, margin=0.2, semi_hard=True)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(used) == float(aux["num_triplets"])
