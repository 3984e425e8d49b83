"""The training state and the per-device steps, as pure functions of an axis name.

The step is written for one device and mapped with `jax.pmap(..., axis_name=AXIS)` in
`train.py` (one line to change for shard_map). Collectives: gradients, loss and metrics are
averaged with `lax.pmean`; batch norm normalises with statistics over the whole global batch
(the backbone's batch norms reduce over AXIS), so 1 or N devices compute the same step.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import optax
from flax import jax_utils
from jax import lax

from leopard_jax import losses, metrics
from leopard_jax.models.embedding import EmbeddingModel

AXIS = "batch"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def replicate(tree: Any, devices=None) -> Any:
    """One copy of `tree` per device, laid out exactly as pmap lays out its outputs.

    `flax.jax_utils.replicate` gives the copies a different sharding from the one a pmapped
    step returns, so the step compiled on its first call would compile again on its second
    (~20 s for the demo model on CPU). A pass through an identity pmap over the same axis
    gives the first call the layout every later call sees."""
    return jax.pmap(lambda x: jax.tree.map(jnp.copy, x), axis_name=AXIS, devices=devices)(
        jax_utils.replicate(tree, devices))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {"model": backbone + head params, "centers": [C, D] (margin losses only)}
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def model_kwargs(model_config: ml_collections.ConfigDict, **fixed: Any) -> dict[str, Any]:
    """EmbeddingModel keyword arguments as stored in an exported model's model.json; `fixed`
    adds settings an imported checkpoint dictates (e.g. spotID's `stem_padding`)."""
    return dict(
        backbone=model_config.backbone,
        head=model_config.head,
        dims=int(model_config.dims),
        drop_path_rate=float(model_config.drop_path_rate),
        **fixed,
    )


def build_model(model_config: ml_collections.ConfigDict, *, axis_name: str | None = AXIS,
                **fixed: Any) -> EmbeddingModel:
    return EmbeddingModel(
        **model_kwargs(model_config, **fixed), dtype=DTYPES[model_config.dtype], bn_axis_name=axis_name
    )


def uses_centers(loss_config: ml_collections.ConfigDict) -> bool:
    return loss_config.name in ("cosface", "arcface")


def lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    o = config.optim
    return optax.exponential_decay(
        o.learning_rate,
        transition_steps=max(1, o.decay_every_epochs * steps_per_epoch),
        decay_rate=o.decay_factor,
        staircase=True,
    )


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam with the paper's step decay (×decay_factor every decay_every_epochs epochs,
    counted in steps); optional gradient clipping, weight decay and frozen class centres."""
    o = config.optim
    schedule = lr_schedule(config, steps_per_epoch)
    parts = []
    if o.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    parts.append(optax.adamw(schedule, weight_decay=o.weight_decay) if o.weight_decay > 0 else optax.adam(schedule))
    # One flat vector instead of ~300 leaves: XLA CPU compiles each leaf's Adam update as
    # separate kernels, which made the step's compile several times slower.
    tx = optax.flatten(optax.chain(*parts))
    if config.loss.train_centers:
        return tx

    def labels(params):
        return {k: jax.tree.map(lambda _: "frozen" if k == "centers" else "train", v) for k, v in params.items()}

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def init_state(
    config: ml_collections.ConfigDict,
    model: EmbeddingModel,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    tx: optax.GradientTransformation,
    init_variables: dict[str, Any] | None = None,
) -> TrainState:
    """A fresh state; `init_variables` (imported weights) replaces the random ones leaf-wise
    where given (e.g. a backbone only: the embedding head stays random)."""
    rng = jax.random.PRNGKey(config.seed)
    rng, init_rng, centers_rng = jax.random.split(rng, 3)
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    unbound = model.clone(bn_axis_name=None)  # no mapped axis during init
    variables = jax.jit(functools.partial(unbound.init, train=False))(init_rng, dummy)
    variables = flax.core.unfreeze(variables)
    if init_variables is not None:
        variables = merge_variables(variables, init_variables)
    params = {"model": variables["params"]}
    if uses_centers(config.loss):
        centers = jax.random.normal(centers_rng, (num_classes, config.model.dims), jnp.float32)
        params["centers"] = centers / jnp.linalg.norm(centers, axis=-1, keepdims=True)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=rng,
    )


def merge_variables(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with the leaves of `update` put in; shapes must agree (a clear error if not)."""
    flat_base = flax.traverse_util.flatten_dict(base, sep="/")
    for path, value in flax.traverse_util.flatten_dict(update, sep="/").items():
        if path not in flat_base:
            raise ValueError(f"imported weights have {path}, which this model does not; check config.model")
        if tuple(flat_base[path].shape) != tuple(value.shape):
            raise ValueError(f"imported {path} has shape {tuple(value.shape)}, model expects {tuple(flat_base[path].shape)}")
        flat_base[path] = jnp.asarray(value, flat_base[path].dtype)
    return flax.traverse_util.unflatten_dict(flat_base, sep="/")


def compute_loss(loss_config, embeddings, centers, labels, key, epoch):
    """(mean loss over used samples, number of samples/triplets used) for the configured loss."""
    if loss_config.name == "cosface":
        loss, aux = losses.cosface_loss(
            embeddings, centers, labels, scale=loss_config.scale, margin=loss_config.margin,
            margin_fn=loss_config.margin_fn)
        used = jnp.sum(labels >= 0)
    elif loss_config.name == "arcface":
        loss, aux = losses.arcface_loss(embeddings, centers, labels, scale=loss_config.scale, margin=loss_config.margin)
        used = jnp.sum(labels >= 0)
    else:
        semi_hard = epoch >= loss_config.triplet_warmup_epochs
        loss, aux = losses.triplet_loss(embeddings, labels, key, margin=loss_config.triplet_margin, semi_hard=semi_hard)
        used = aux["num_triplets"]
    return loss, used.astype(jnp.float32)


def train_step(state: TrainState, batch: dict[str, jax.Array], epoch: jax.Array, *,
                              model: EmbeddingModel, tx: optax.GradientTransformation,
                              loss_config: ml_collections.ConfigDict, axis_name: str = AXIS):
    """One optimisation step on this device's share of the global batch.

    The loss is this device's mean, reweighted by its share of the used samples so that the
    pmean of gradients is the gradient of the global-batch mean. A step whose loss or
    gradients are not finite leaves the state as it was (the caller counts it).
    """
    step_rng = jax.random.fold_in(state.rng, state.step)
    device_rng = jax.random.fold_in(step_rng, lax.axis_index(axis_name))
    dropout_rng, loss_rng = jax.random.split(device_rng)
    labels = batch["label"]

    def loss_fn(params):
        embeddings, new_vars = model.apply(
            {"params": params["model"], "batch_stats": state.batch_stats},
            batch["image"], train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        loss, used = compute_loss(loss_config, embeddings, params.get("centers"), labels, loss_rng, epoch)
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
        params=optax.apply_updates(state.params, unravel_updates(jnp.where(finite, flat_updates, 0.0))),
        batch_stats=unravel_stats(jnp.where(finite, lax.pmean(flat_stats, axis_name), flat_old_stats)),
        opt_state=jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_opt_state, state.opt_state),
    )
    dt5ap = metrics.batch_dtkap(embeddings, labels, k=5, mask=batch["mask"])
    logs = {
        "loss": global_loss,
        "finite": finite.astype(jnp.float32),
        "batch_dt5ap": lax.pmean(dt5ap, axis_name),
    }
    return new_state, logs


def embed_step(state: TrainState, images: jax.Array, *, model: EmbeddingModel) -> jax.Array:
    """Eval-mode embeddings of one device's images (running batch-norm statistics)."""
    return model.apply({"params": state.params["model"], "batch_stats": state.batch_stats}, images, train=False)


def sync_batch_stats(state: TrainState, axis_name: str = AXIS) -> TrainState:
    """Average batch-norm running statistics over devices (before eval and checkpoints)."""
    return state.replace(batch_stats=lax.pmean(state.batch_stats, axis_name))
