"""The training loop, `train_and_evaluate(config, workdir)`: what `python -m leopard_jax.train`
runs.

Trains the embedding network data-parallel over all local devices (pmap), evaluates on
held-out individuals every `config.eval.every_epochs` epochs, keeps orbax checkpoints
(latest for resume, best by DT5AP) and exports the best model to W/best_model for `embed`.
Rerunning with the same workdir resumes where the last run stopped, mid-epoch included.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import pathlib
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from leopard_jax import config as config_lib
from leopard_jax import model_io, parallel
from leopard_jax.data import pipeline, records
from leopard_jax.train import TrainingError, checkpoints, evaluation, report, rows, steps
from leopard_jax.train import state as state_lib


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended: the last metrics record (empty when there was nothing left to
    train) and the final state, as host arrays."""

    record: dict[str, Any]
    state: state_lib.TrainState


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Outcome:
    """Runs (or resumes) training."""
    config_lib.validate(config)
    initialize_distributed(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    check_batch_layout(config, jax.device_count())

    # Data: the training and held-out individuals, their labels, the epoch length.
    input_shape = records.record_shape(records.load_settings(config.data_dir))
    train_rows, test_rows = rows.split_rows(records.read_manifest(config.data_dir), config, workdir)
    classes = pipeline.class_names(train_rows)
    train_labels = pipeline.label_array(train_rows, classes)
    test_images = records.RecordSource(config.data_dir, test_rows)
    test_labels = pipeline.label_array(test_rows, pipeline.class_names(test_rows))
    steps_per_epoch = epoch_length(config, train_rows, train_labels)

    # Model, optimiser and state: fresh, or where the last run stopped.
    init_variables, fixed_model_kwargs = state_lib.load_init(config)
    model = state_lib.build_model(config.model, **fixed_model_kwargs)
    tx = state_lib.make_optimizer(config, steps_per_epoch)
    host_state = state_lib.init_state(
        config,
        model,
        num_classes=len(classes),
        input_shape=input_shape,
        tx=tx,
        init_variables=init_variables,
    )
    ckpts = checkpoints.RunCheckpoints(workdir)
    progress = checkpoints.Progress()
    if ckpts.latest_step() is not None:
        host_state, progress = ckpts.restore(checkpoints.LATEST, host_state)
        if is_main:
            print(
                f"resuming from {workdir}/checkpoints/latest: epoch {progress.epoch}, "
                f"step {progress.step_in_epoch} of {steps_per_epoch}",
                file=sys.stderr,
            )
    if progress.epoch >= config.num_epochs:
        print(
            f"{workdir}: already trained {config.num_epochs} epochs; raise config.num_epochs "
            "to train on",
            file=sys.stderr,
        )
        ckpts.close()
        return Outcome({}, host_state)

    # The held-out images go to the devices once, when they fit (config.eval.cache_mb).
    test_images = evaluation.held_out_images(test_images, config)
    p_train_step = jax.pmap(
        functools.partial(steps.train_step, model=model, tx=tx, loss_config=config.loss),
        axis_name=parallel.AXIS,
        donate_argnums=(0,),
    )
    rstate = parallel.replicate(host_state)
    description = model_description(config, fixed_model_kwargs, input_shape, len(classes))
    schedule = state_lib.lr_schedule(config, steps_per_epoch)
    reporter = report.Reporter(workdir, enabled=is_main)
    record: dict[str, Any] = {}
    data = batches = batch = None
    stop = StopSignals()  # SIGTERM/SIGINT from here on: save `latest`, then exit
    started = time.perf_counter()
    try:
        # One input stream for the rest of the run (workers start once), two batches ahead
        # on the devices, read by a thread of its own; it starts where the checkpoint left off.
        data = train_data(config, train_rows, train_labels, progress)
        batches = parallel.prefetch_to_device(data, size=2)
        # The step compiles first, for the first batch (`compile_ahead` clears JAX's caches).
        train_step = parallel.compile_ahead(
            p_train_step, rstate, batches.peek(), parallel.replicate(np.int32(progress.epoch))
        )
        float(schedule(0))  # its few ops compile here, not at the first epoch boundary
        if progress.epoch == 0 and progress.step_in_epoch == 0:
            record = {
                "epoch": 0,
                "step": 0,
                **evaluation.evaluate(model, rstate, test_images, test_labels, config),
            }
            reporter.write(record)
        bad_in_a_row = 0
        for epoch in range(progress.epoch, config.num_epochs):
            epoch_on_devices = parallel.replicate(np.int32(epoch))
            meter = EpochMeter()
            bar = tqdm(
                total=steps_per_epoch,
                initial=progress.step_in_epoch,
                unit="step",
                desc=f"epoch {epoch + 1}/{config.num_epochs}",
                disable=not is_main,
                dynamic_ncols=True,
            )
            # Step n+1 is dispatched before step n's logs are read, so the devices always
            # have the next step queued while the host reads logs and refills the prefetch.
            pending = None
            for batch in itertools.islice(batches, steps_per_epoch - progress.step_in_epoch):
                rstate, logs = train_step(rstate, batch, epoch_on_devices)
                progress.step_in_epoch += 1
                if pending is not None:
                    bad_in_a_row = account_step(pending, meter, bar, progress, bad_in_a_row)
                    check_finite(bad_in_a_row, config, epoch, workdir)
                pending = logs
                if stop.signum is not None and progress.step_in_epoch < steps_per_epoch:
                    account_step(pending, meter, bar, progress, bad_in_a_row)
                    raise Interrupted()  # (after an epoch's last step: once it is saved)
            if pending is not None:
                bad_in_a_row = account_step(pending, meter, bar, progress, bad_in_a_row)
                check_finite(bad_in_a_row, config, epoch, workdir)
            bar.close()
            train_stats = meter.summary()

            # End of epoch: evaluate, keep the best, checkpoint, report. (Batch-norm
            # statistics need no sync: every step averages them over all devices.)
            host_state = parallel.unreplicate(rstate)
            progress.epoch, progress.step_in_epoch = epoch + 1, 0
            record = {
                "epoch": epoch + 1,
                "step": int(host_state.step),
                **train_stats,
                "learning_rate": float(schedule(int(host_state.step))),
                "skipped_steps": progress.skipped_steps,
                "uptime_s": time.perf_counter() - started,  # rates over boundaries too
            }
            if (epoch + 1) % config.eval.every_epochs == 0 or epoch + 1 == config.num_epochs:
                record.update(evaluation.evaluate(model, rstate, test_images, test_labels, config))
                if record["test_DT5AP"] > progress.best_dt5ap:
                    progress.best_dt5ap = record["test_DT5AP"]
                    ckpts.save(checkpoints.BEST, host_state, progress)
                    if is_main:
                        ckpts.after_saves(export_best, workdir, host_state, description, record)
            ckpts.save(checkpoints.LATEST, host_state, progress)
            reporter.write(record)
            reporter.print(record)
            if stop.signum is not None:
                raise Interrupted(saved=True)
    except Interrupted as stopped:
        if not stopped.saved:
            ckpts.save(checkpoints.LATEST, parallel.unreplicate(rstate), progress)
        ckpts.wait()
        print(
            f"interrupted: saved {workdir}/checkpoints/latest (epoch {progress.epoch + 1}, "
            f"step {progress.step_in_epoch}); rerun the same command to resume",
            file=sys.stderr,
        )
        raise SystemExit(128 + stop.signum) from None
    finally:
        if batches is not None:
            batches.close()  # its reading thread first: it reads from `data`
        if data is not None:
            data.close()  # stops the workers, also mid-epoch
            data = batches = batch = None  # the stream holds batches in shared memory
            pipeline.release_shared_memory()
        stop.restore()
        reporter.close()
        ckpts.close()
    return Outcome(record, parallel.unreplicate(rstate))


# --- helpers, in the order the loop calls them ---------------------------------------


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """jax.distributed for multi-host runs: arguments from the environment (TPU/SLURM), or
    the config's when coordinator_address is set."""
    if not config.distributed:
        return
    kwargs = {}
    if config.coordinator_address:
        kwargs = dict(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    jax.distributed.initialize(**kwargs)


def check_batch_layout(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """The global batch splits into equal device shards of whole identity groups."""
    if config.batch_size % num_devices:
        raise TrainingError(
            f"config.batch_size={config.batch_size} does not divide over {num_devices} devices; "
            f"use a multiple of {num_devices}"
        )
    per_device = config.batch_size // num_devices
    if per_device % config.images_per_identity:
        raise TrainingError(
            f"config.batch_size={config.batch_size} gives {per_device} images per device, not a "
            f"multiple of images_per_identity={config.images_per_identity}; use a batch of "
            f"{num_devices * config.images_per_identity}·k"
        )


def epoch_length(config: ml_collections.ConfigDict, train_rows, train_labels) -> int:
    """Steps per epoch (every epoch has the same count: sampling packs them so)."""
    table = pipeline.train_table(
        train_rows,
        labels=train_labels,
        global_batch=config.batch_size,
        seed=config.seed,
        epoch=0,
        num_devices=jax.device_count(),
        images_per_identity=config.images_per_identity,
        keep_singletons=config.keep_singletons,
    )
    return len(table)


def model_description(
    config: ml_collections.ConfigDict,
    fixed_model_kwargs: dict[str, Any],
    input_shape: tuple[int, int, int],
    num_classes: int,
) -> dict[str, Any]:
    """model.json of the exported best model: how to build it and what it was trained on."""
    height, width, channels = input_shape
    return {
        "model": state_lib.model_kwargs(config.model, **fixed_model_kwargs),
        "input": {"height": height, "width": width, "channels": channels},
        "info": {
            "config": config.to_dict(),
            "classes": num_classes,
            "dataset": str(config.data_dir),
        },
    }


class StopSignals:
    """From creation until `restore()`, SIGTERM/SIGINT only set `signum`, so the loop can
    save `latest` after the step in flight instead of dying mid-write."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {
            s: signal.signal(s, self._record) for s in (signal.SIGTERM, signal.SIGINT)
        }

    def _record(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Interrupted(Exception):
    """A stop signal arrived; the loop saves `latest` (unless `saved`: the epoch that just
    ended is already queued as `latest`, and orbax refuses a step twice) and exits 128 + the
    signal."""

    def __init__(self, saved: bool = False):
        super().__init__()
        self.saved = saved


def train_data(
    config: ml_collections.ConfigDict, train_rows, train_labels, progress: checkpoints.Progress
) -> pipeline.Epoch:
    """This process's batches from (progress.epoch, progress.step_in_epoch) to the end of
    the run: augmented, a fixed order from seed and epoch, uint8 (normalised, and augmented
    when config.augment.where resolves to "device", in the step)."""
    return pipeline.train_loader(
        train_rows,
        config.data_dir,
        labels=train_labels,
        global_batch=config.batch_size,
        seed=config.seed,
        epoch=progress.epoch,
        num_epochs=config.num_epochs - progress.epoch,
        start_step=progress.step_in_epoch,
        num_devices=jax.device_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        images_per_identity=config.images_per_identity,
        augment_config=config.augment.to_dict(),
        worker_count=config.workers,
        keep_singletons=config.keep_singletons,
        normalize=False,
    )


def check_finite(
    bad_in_a_row: int, config: ml_collections.ConfigDict, epoch: int, workdir: pathlib.Path
) -> None:
    """Stop after config.max_bad_steps non-finite steps in a row (each leaves the state as
    it was, so the last good checkpoint is still good)."""
    if bad_in_a_row >= config.max_bad_steps:
        raise TrainingError(
            f"{bad_in_a_row} steps in a row had a non-finite loss (epoch {epoch + 1}); the last "
            f"good checkpoint is in {workdir}/checkpoints/latest. Lower "
            "config.optim.learning_rate or set config.optim.grad_clip_norm"
        )


def account_step(
    logs: dict[str, Any],
    meter: EpochMeter,
    bar: tqdm,
    progress: checkpoints.Progress,
    bad_in_a_row: int,
) -> int:
    """Reads one step's logs (waiting for that step, not for the one queued behind it) into
    the meter and the progress bar; returns the count of non-finite steps in a row."""
    logs = parallel.unreplicate(logs)
    finite = bool(logs["finite"] >= 1)
    progress.skipped_steps += not finite
    meter.add(logs)
    bar.update(1)  # tqdm redraws at most every 0.1 s; the postfix waits for that redraw
    bar.set_postfix(loss=f"{logs['loss']:.3f}", img_s=f"{meter.images_per_s():.1f}", refresh=False)
    return 0 if finite else bad_in_a_row + 1


@dataclasses.dataclass
class EpochMeter:
    """One epoch's running means over finite steps, and the image rate over all processes."""

    losses: list[float] = dataclasses.field(default_factory=list)
    dt5aps: list[float] = dataclasses.field(default_factory=list)
    images: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, logs: dict[str, Any]) -> None:
        if logs["finite"] >= 1:
            self.losses.append(float(logs["loss"]))
            self.dt5aps.append(float(logs["batch_dt5ap"]))
        self.images += int(logs["images"])  # over all devices and processes

    def images_per_s(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.images / max(elapsed, 1e-9)

    def summary(self) -> dict[str, float]:
        return {
            "train_loss": float(np.mean(self.losses)) if self.losses else float("nan"),
            "train_batch_DT5AP": float(np.mean(self.dt5aps)) if self.dt5aps else float("nan"),
            "images_per_s": self.images_per_s(),
        }


def export_best(
    workdir: pathlib.Path,
    host_state: state_lib.TrainState,
    description: dict[str, Any],
    record: dict[str, Any],
) -> None:
    """W/best_model: the model `embed` loads, with the epoch and score it was chosen at."""
    variables = {"params": host_state.params["model"], "batch_stats": host_state.batch_stats}
    info = {
        **description["info"],
        "epoch": record["epoch"],
        "step": record["step"],
        "test_DT5AP": record["test_DT5AP"],
    }
    model_io.save_model(workdir / model_io.WORKDIR_BEST, variables, {**description, "info": info})
