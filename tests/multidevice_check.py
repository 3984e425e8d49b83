"""Runs the pmapped train step on 1 and on N devices over the same global batches and
prints the losses and the parameter difference as JSON (for test_train.py; the device
count is fixed when JAX starts, so this runs in its own process).

SGD instead of Adam: Adam's first steps are nearly sign(g), which turns reduction-order
noise in near-zero gradients into ±lr steps; SGD keeps the comparison exact.

usage: XLA_FLAGS=--xla_force_host_platform_device_count=N multidevice_check.py DATASET N
"""

import functools
import json
import sys

import jax
import numpy as np
import optax
from flax import traverse_util

from configs import demo
from leopard_jax import parallel
from leopard_jax.data import pipeline, records
from leopard_jax.train import state as state_lib
from leopard_jax.train import steps


def main(dataset: str, n_devices: int) -> None:
    config = demo.get_config()
    config.model.backbone, config.model.dims, config.seed = "resnet18", 16, 3
    rows = [r for r in records.read_manifest(dataset) if r["split"] == "train"]
    labels = np.unique([r["identity"] for r in rows], return_inverse=True)[1].astype(np.int32)
    height, width, channels = records.record_shape(records.load_settings(dataset))
    model, tx = state_lib.build_model(config.model), optax.sgd(1e-4)
    state = state_lib.init_state(
        config,
        model,
        num_classes=int(labels.max()) + 1,
        input_shape=(height, width, channels),
        tx=tx,
    )
    step = functools.partial(steps.train_step, model=model, tx=tx, loss_config=config.loss)
    result = {}
    for n in (1, n_devices):
        devices = jax.devices()[:n]
        p_step = jax.pmap(step, axis_name=parallel.AXIS, devices=devices)
        rstate, epoch = parallel.replicate(state, devices), parallel.replicate(np.int32(0), devices)
        losses = []
        for batch in pipeline.train_loader(
            rows,
            dataset,
            labels=labels,
            global_batch=8,
            seed=3,
            epoch=0,
            num_devices=n,
            augment_config=config.augment.to_dict(),
            normalize=False,  # uint8: the step normalises (and augments, where="device")
        ):
            rstate, logs = p_step(rstate, parallel.shard(batch, n), epoch)
            losses.append(float(parallel.unreplicate(logs)["loss"]))
        params = traverse_util.flatten_dict(parallel.unreplicate(rstate).params, sep="/")
        result[n] = (losses, params)
    (losses_1, params_1), (losses_n, params_n) = result[1], result[n_devices]
    print(
        json.dumps(
            {
                "losses_1": losses_1,
                "losses_n": losses_n,
                "max_param_diff": max(
                    float(np.abs(params_1[k] - params_n[k]).max()) for k in params_1
                ),
                "max_param": max(float(np.abs(params_1[k]).max()) for k in params_1),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
