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


def test_the_step_normalises_uint8_and_applies_drawn_augmentation_on_device():
    """uint8 in: normalised as the embed path does; with matrix/jitter: augmented first
    (identity parameters change nothing); float32 (normalised on the host) passes through."""
    from leopard_jax import inference
    from leopard_jax.data import augment, device_augment

    image = np.random.default_rng(0).integers(0, 256, (2, 8, 16, 4), dtype=np.uint8)
    plain = np.asarray(steps.input_images({"image": jnp.asarray(image)}))
    np.testing.assert_allclose(plain, augment.normalize(image), rtol=1e-5, atol=1e-5)
    identity = {
        "image": jnp.asarray(image),
        "matrix": jnp.tile(jnp.eye(2, 3), (2, 1, 1)),
        "jitter": jnp.ones((2, 3)),
    }
    np.testing.assert_array_equal(np.asarray(steps.input_images(identity)), plain)
    matrix, factors = augment.draw(np.random.default_rng(1), 8, 16, augment.AugmentConfig())
    drawn = {
        "image": jnp.asarray(image),
        "matrix": jnp.asarray(np.stack([matrix] * 2), jnp.float32),
        "jitter": jnp.asarray(np.stack([factors] * 2), jnp.float32),
    }
    expected = inference.normalize(
        device_augment.augment_batch(drawn["image"], drawn["matrix"], drawn["jitter"])
    )
    np.testing.assert_array_equal(np.asarray(steps.input_images(drawn)), np.asarray(expected))
    floats = jnp.asarray(augment.normalize(image))
    assert steps.input_images({"image": floats}) is floats
