"""The per-device training step, a pure function of an axis name.

Each is written for one device and mapped with `jax.pmap(..., axis_name=parallel.AXIS)` by
the loop (one line to change for shard_map). Collectives: gradients, loss and metrics are
averaged with `lax.pmean`; batch norm normalises with statistics over the whole global batch
(the backbone's batch norms reduce over AXIS), so 1 or N devices compute the same step.
The running batch-norm statistics are averaged in every step too, so the replicas never
drift apart and an epoch boundary has nothing to synchronise.
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax

from leopard_jax import inference, losses, metrics
from leopard_jax.data import device_augment
from leopard_jax.models.embedding import EmbeddingModel
from leopard_jax.parallel import AXIS
from leopard_jax.train.state import TrainState


def compute_loss(
    loss_config: ml_collections.ConfigDict,
    embeddings: jax.Array,
    centers: jax.Array | None,
    labels: jax.Array,
    key: jax.Array,
    epoch: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(mean loss over used samples, number of samples/triplets used, float32) for the
    configured loss (`losses.LOSSES[loss_config.name]`)."""
    loss, used = losses.LOSSES[loss_config.name].fn(
        loss_config, embeddings, centers, labels, key, epoch
    )
    return loss, used.astype(jnp.float32)


def input_images(batch: dict[str, jax.Array]) -> jax.Array:
    """The batch's images as the model takes them, float32 normalised. The loader sends
    uint8 (a quarter of float32's bytes), normalised here; with `augment.where="device"`
    also unaugmented, with each image's drawn `matrix` and `jitter`, applied here first.
    Float images were normalised on the host and pass through."""
    images = batch["image"]
    if "matrix" in batch:
        images = device_augment.augment_batch(images, batch["matrix"], batch["jitter"])
        return inference.normalize(images)
    if images.dtype == jnp.uint8:
        return inference.normalize(images)
    return images


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    epoch: jax.Array,
    *,
    model: EmbeddingModel,
    tx: optax.GradientTransformation,
    loss_config: ml_collections.ConfigDict,
    axis_name: str = AXIS,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on this device's share of the global batch.

    The loss is this device's mean, reweighted by its share of the used samples so that the
    pmean of gradients is the gradient of the global-batch mean. A step whose loss or
    gradients are not finite leaves the state as it was (the caller counts it).
    """
    step_rng = jax.random.fold_in(state.rng, state.step)
    device_rng = jax.random.fold_in(step_rng, lax.axis_index(axis_name))
    dropout_rng, loss_rng = jax.random.split(device_rng)
    labels = batch["label"]
    images = input_images(batch)

    def loss_fn(params):
        embeddings, new_vars = model.apply(
            {"params": params["model"], "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
        )
        loss, used = compute_loss(
            loss_config, embeddings, params.get("centers"), labels, loss_rng, epoch
        )
        share = used / jnp.maximum(lax.pmean(used, axis_name), 1e-9)
        return loss * share, (loss, used, embeddings, new_vars["batch_stats"])

    grads, (loss, used, embeddings, new_batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    # Collectives and checks on flat vectors: per-leaf all-reduces and selects are hundreds
    # of small ops that slow XLA's compile far more than they cost to run.
    flat_grads, unravel_grads = jax.flatten_util.ravel_pytree(grads)
    flat_grads = lax.pmean(flat_grads, axis_name)
    total_used = lax.psum(used, axis_name)
    global_loss = lax.psum(loss * used, axis_name) / jnp.maximum(total_used, 1e-9)
    finite = jnp.isfinite(global_loss) & jnp.all(jnp.isfinite(flat_grads))
    updates, new_opt_state = tx.update(unravel_grads(flat_grads), state.opt_state, state.params)
    flat_updates, unravel_updates = jax.flatten_util.ravel_pytree(updates)
    flat_stats, unravel_stats = jax.flatten_util.ravel_pytree(new_batch_stats)
    flat_old_stats, _ = jax.flatten_util.ravel_pytree(state.batch_stats)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(
            state.params, unravel_updates(jnp.where(finite, flat_updates, 0.0))
        ),
        batch_stats=unravel_stats(
            jnp.where(finite, lax.pmean(flat_stats, axis_name), flat_old_stats)
        ),
        opt_state=jax.tree.map(
            lambda n, o: jnp.where(finite, n, o), new_opt_state, state.opt_state
        ),
    )
    dt5ap = metrics.batch_dtkap(embeddings, labels, k=5, mask=batch["mask"])
    logs = {
        "loss": global_loss,
        "finite": finite.astype(jnp.float32),
        "batch_dt5ap": lax.pmean(dt5ap, axis_name),
        "images": lax.psum(jnp.sum(batch["mask"]), axis_name),  # real (unpadded) images
    }
    return new_state, logs
