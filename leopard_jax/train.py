"""python -m leopard_jax.train --config configs/default.py --workdir W [--config.key=value]

Trains the embedding network data-parallel over all local devices (pmap), evaluates on
held-out individuals every epoch, keeps orbax checkpoints (latest for resume, best by
DT5AP) and exports the best model to W/best_model for `embed`. Rerunning the same command
with the same workdir resumes where the last run stopped.
"""

from __future__ import annotations

import functools
import json
import pathlib
import signal
import sys
import time
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the exported model.")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


class Interrupted(Exception):
    pass


def split_rows(rows, config, workdir: pathlib.Path):
    """(train rows, held-out rows): the dataset's split.json, else a split by individual made
    here and kept in the workdir so a resumed run uses the same one."""
    from leopard_jax.data import split as split_lib

    labelled = [r for r in rows if r["identity"]]
    if any(r["split"] for r in labelled):
        train = [r for r in labelled if r["split"] == "train"]
        test = [r for r in labelled if r["split"] == "test"]
    else:
        path = workdir / "split.json"
        if path.is_file():
            by_split = json.loads(path.read_text())
        else:
            by_split = split_lib.split_identities(
                sorted({r["identity"] for r in labelled}), test_fraction=config.split.test_fraction, seed=config.split.seed)
            path.write_text(json.dumps({k: sorted(v) for k, v in by_split.items()}, indent=2))
        test_ids = set(by_split["test"])
        train = [r for r in labelled if r["identity"] not in test_ids]
        test = [r for r in labelled if r["identity"] in test_ids]
    if not config.keep_singletons:
        counts: dict[str, int] = {}
        for r in train:
            counts[r["identity"]] = counts.get(r["identity"], 0) + 1
        train = [r for r in train if counts[r["identity"]] > 1]
    if not train:
        raise TrainingError(f"{config.data_dir}: no training individual with two or more images; add labelled photos")
    if not test:
        raise TrainingError(f"{config.data_dir}: no held-out individuals; lower config.split.test_fraction or add individuals")
    return train, test


def load_init(config) -> tuple[dict | None, dict]:
    """(imported variables or None for random, the model settings the import dictates)."""
    from leopard_jax.models import convert
    from leopard_jax.models.embedding import SPOTID_CLASSES

    if config.init.kind == "timm":
        classes = SPOTID_CLASSES if config.model.head == "spotid" else 0
        backbone = convert.load_timm_backbone(config.init.path, config.model.backbone, in_chans=4, num_classes=classes)
        return {k: {"backbone": v} for k, v in backbone.items()}, {}
    if config.init.kind == "spotid":
        variables, kwargs = convert.load_spotid(config.init.path, config.model.backbone)
        for key in ("head", "dims"):
            if kwargs[key] != config.model[key]:
                raise TrainingError(f"config.model.{key}={config.model[key]!r}, but {config.init.path} has "
                                    f"{kwargs[key]!r}; set --config.model.{key}={kwargs[key]}")
        return variables, {k: kwargs[k] for k in ("stem_padding",) if k in kwargs}
    return None, {}


def encode_state(state) -> Any:
    """A data iterator's state as JSON (grain gives bytes or a dict)."""
    if isinstance(state, bytes):
        return {"bytes": state.decode("latin-1")}
    return {"json": state}


def decode_state(encoded) -> Any:
    return encoded["bytes"].encode("latin-1") if "bytes" in encoded else encoded["json"]


class Reporter:
    """metrics.jsonl + TensorBoard event files, written by process 0 only."""

    def __init__(self, workdir: pathlib.Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            self.jsonl = open(workdir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                self.tb.add_scalar(key, value, record["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last epoch's record and the final state
    (host arrays)."""
    import jax
    import numpy as np
    from flax import jax_utils
    from tqdm import tqdm

    from leopard_jax import checkpointing, metrics, model_io
    from leopard_jax import train_step as ts
    from leopard_jax.config import validate
    from leopard_jax.data import pipeline, records

    validate(config)
    if config.distributed:
        kwargs = {}
        if config.coordinator_address:
            kwargs = dict(coordinator_address=config.coordinator_address, num_processes=config.num_processes,
                                        process_id=config.process_id)
        jax.distributed.initialize(**kwargs)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    n_local = jax.local_device_count()
    n_global = jax.device_count()
    if config.batch_size % n_global:
        raise TrainingError(
            f"config.batch_size={config.batch_size} does not divide over {n_global} devices; use a multiple of {n_global}")
    per_device = config.batch_size // n_global
    if per_device % config.images_per_identity:
        raise TrainingError(
            f"config.batch_size={config.batch_size} gives {per_device} images per device, not a multiple of "
            f"images_per_identity={config.images_per_identity}; use a batch of {n_global * config.images_per_identity}·k")

    settings = records.load_settings(config.data_dir)
    height, width, channels = records.record_shape(settings)
    train_rows, test_rows = split_rows(records.read_manifest(config.data_dir), config, workdir)
    class_names = pipeline.class_names(train_rows)
    train_labels = pipeline.label_array(train_rows, class_names)
    test_labels = pipeline.label_array(test_rows, pipeline.class_names(test_rows))

    def loader(epoch: int):
        return pipeline.train_loader(
            train_rows, config.data_dir, labels=train_labels, global_batch=config.batch_size, seed=config.seed,
            epoch=epoch, num_devices=n_global, process_index=jax.process_index(), process_count=jax.process_count(),
            images_per_identity=config.images_per_identity, augment_config=config.augment.to_dict(),
            worker_count=config.workers, keep_singletons=config.keep_singletons)

    steps_per_epoch = len(pipeline.train_table(
        train_rows, labels=train_labels, global_batch=config.batch_size, seed=config.seed, epoch=0,
        num_devices=n_global, images_per_identity=config.images_per_identity, keep_singletons=config.keep_singletons))
    init_variables, fixed_model_kwargs = load_init(config)
    model = ts.build_model(config.model, **fixed_model_kwargs)
    tx = ts.make_optimizer(config, steps_per_epoch)
    state = ts.init_state(config, model, num_classes=len(class_names), input_shape=(height, width, channels), tx=tx,
                          init_variables=init_variables)

    ckpts = checkpointing.RunCheckpoints(workdir)
    progress = {"epoch": 0, "step_in_epoch": 0, "data_state": None, "best_dt5ap": -1.0, "skipped_steps": 0}
    if ckpts.latest_step() is not None:
        state, progress = ckpts.restore(checkpointing.LATEST, state)
        if is_main:
            print(f"resuming from {workdir}/checkpoints/latest: epoch {progress['epoch']}, "
                        f"step {progress['step_in_epoch']} of {steps_per_epoch}", file=sys.stderr)
    if progress["epoch"] >= config.num_epochs:
        print(f"{workdir}: already trained {config.num_epochs} epochs; raise config.num_epochs to train on", file=sys.stderr)
        ckpts.close()
        return {}, state

    p_train = jax.pmap(functools.partial(ts.train_step, model=model, tx=tx, loss_config=config.loss),
                                          axis_name=ts.AXIS, donate_argnums=(0,))
    p_embed = jax.pmap(functools.partial(ts.embed_step, model=model), axis_name=ts.AXIS)
    p_sync = jax.pmap(ts.sync_batch_stats, axis_name=ts.AXIS)
    rstate = ts.replicate(state)
    reporter = Reporter(workdir, is_main)
    description = {
        "model": ts.model_kwargs(config.model, **fixed_model_kwargs),
        "input": {"height": height, "width": width, "channels": channels},
        "info": {"config": config.to_dict(), "classes": len(class_names), "dataset": str(config.data_dir)},
    }

    def unreplicated():
        return jax.device_get(jax_utils.unreplicate(rstate))

    def evaluate() -> dict[str, float]:
        """Held-out retrieval metrics. Every process embeds the whole held-out set (small),
        so all processes agree on the best model."""
        chunks = []
        for batch in pipeline.eval_batches(test_rows, config.data_dir, batch=config.eval.batch_size * n_local):
            images = batch["image"].reshape(n_local, -1, *batch["image"].shape[1:])
            emb = np.asarray(p_embed(rstate, images)).reshape(-1, config.model.dims)
            chunks.append(emb[batch["mask"]])
        result = metrics.retrieval_metrics(np.concatenate(chunks), test_labels, k_max=config.eval.k_max,
                                           metric="euclidean" if config.loss.name == "triplet" else "cosine")
        return {k: result[k] for k in ("DT5AP", "T1RMD", "T5RMD", "CCDR")}

    def save(which: str) -> None:
        ckpts.save(which, int(jax.device_get(rstate.step[0])), unreplicated(), progress)

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    record: dict[str, Any] = {}
    try:
        if progress["epoch"] == 0 and progress["step_in_epoch"] == 0:
            record = {"epoch": 0, "step": 0, **{f"test_{k}": v for k, v in evaluate().items()}}
            reporter.write(record)
        bad_in_a_row = 0
        for epoch in range(progress["epoch"], config.num_epochs):
            data = loader(epoch)
            iterator = iter(data)
            if progress["step_in_epoch"] and progress["data_state"] is not None:
                iterator.set_state(decode_state(progress["data_state"]))
            losses_seen, dt5aps, images_seen, start = [], [], 0, time.perf_counter()
            bar = tqdm(total=len(data), initial=progress["step_in_epoch"], desc=f"epoch {epoch + 1}/{config.num_epochs}",
                                  disable=not is_main, unit="step", dynamic_ncols=True)
            for batch in iterator:
                sharded = {k: v.reshape(n_local, -1, *v.shape[1:]) for k, v in batch.items()}
                rstate, logs = p_train(rstate, sharded, jax_utils.replicate(np.int32(epoch)))
                logs = jax.device_get(jax_utils.unreplicate(logs))
                progress["step_in_epoch"] += 1
                progress["data_state"] = encode_state(iterator.get_state())
                if logs["finite"] < 1:
                    bad_in_a_row += 1
                    progress["skipped_steps"] += 1
                    if bad_in_a_row >= config.max_bad_steps:
                        raise TrainingError(
                            f"{bad_in_a_row} steps in a row had a non-finite loss (epoch {epoch + 1}); the last good checkpoint "
                            f"is in {workdir}/checkpoints/latest. Lower config.optim.learning_rate or set config.optim.grad_clip_norm")
                else:
                    bad_in_a_row = 0
                    losses_seen.append(float(logs["loss"]))
                    dt5aps.append(float(logs["batch_dt5ap"]))
                images_seen += int(batch["mask"].sum())
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.3f}", img_s=f"{images_seen * jax.process_count() / (time.perf_counter() - start):.1f}")
                if stop["signal"] is not None:
                    raise Interrupted()
            bar.close()
            elapsed = time.perf_counter() - start
            rstate = p_sync(rstate)
            progress.update(epoch=epoch + 1, step_in_epoch=0, data_state=None)
            record = {
                "epoch": epoch + 1,
                "step": int(jax.device_get(rstate.step[0])),
                "train_loss": float(np.mean(losses_seen)) if losses_seen else float("nan"),
                "train_batch_DT5AP": float(np.mean(dt5aps)) if dt5aps else float("nan"),
                "learning_rate": float(ts.lr_schedule(config, steps_per_epoch)(int(jax.device_get(rstate.step[0])))),
                "images_per_s": images_seen * jax.process_count() / max(elapsed, 1e-9),
                "skipped_steps": progress["skipped_steps"],
            }
            if (epoch + 1) % config.eval.every_epochs == 0 or epoch + 1 == config.num_epochs:
                record.update({f"test_{k}": v for k, v in evaluate().items()})
                if record["test_DT5AP"] > progress["best_dt5ap"]:
                    progress["best_dt5ap"] = record["test_DT5AP"]
                    save(checkpointing.BEST)
                    if is_main:
                        model_io.save_model(workdir / model_io.WORKDIR_BEST, {
                                "params": unreplicated().params["model"], "batch_stats": unreplicated().batch_stats},
                            {**description, "info": {**description["info"], "epoch": epoch + 1, "step": record["step"],
                                                                                  "test_DT5AP": record["test_DT5AP"]}})
            save(checkpointing.LATEST)
            reporter.write(record)
            if is_main:
                print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                            file=sys.stderr)
    except Interrupted:
        save(checkpointing.LATEST)
        print(f"interrupted: saved {workdir}/checkpoints/latest (epoch {progress['epoch'] + 1}, step "
                    f"{progress['step_in_epoch']}); rerun the same command to resume", file=sys.stderr)
        raise SystemExit(128 + stop["signal"])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        reporter.close()
        ckpts.close()
    return record, unreplicated()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    from leopard_jax.config import ConfigError

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    app.run(main)
