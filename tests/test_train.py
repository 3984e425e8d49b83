"""Training: config errors, 1 vs 2 devices, two processes, exact resume, non-finite stop.

Runs the real CLI in subprocesses (the device count is fixed when JAX starts) on a tiny
dataset and a small backbone. A shared persistent compilation cache keeps the repeated
compiles of the same step cheap.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from leopard_jax import losses
from leopard_jax.data import records

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.py"
HEIGHT, WIDTH = 32, 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    """8 identities × 4 images: 6 train, 2 held out (split.json). Each identity is a fixed
    random pattern plus noise, so there is something to learn."""
    root = tmp_path_factory.mktemp("dataset")
    records.save_settings(root, dict(height=HEIGHT, width=WIDTH, channels=4))
    rng = np.random.default_rng(0)
    items = []
    for ident in range(8):
        pattern = rng.integers(0, 256, (HEIGHT, WIDTH, 4))
        for k in range(4):
            image = np.clip(pattern + rng.normal(0, 20, pattern.shape), 0, 255).astype(np.uint8)
            items.append(
                (
                    {
                        "key": f"id{ident}/{k}",
                        "source": f"id{ident}/{k}.jpg",
                        "identity": f"id{ident}",
                    },
                    image,
                )
            )
    records.write_records(root, "part-00000", items)
    records.save_split(root, {"train": [f"id{i}" for i in range(6)], "test": ["id6", "id7"]})
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("jax_cache")


def overrides(dataset: pathlib.Path, **extra) -> list[str]:
    values = {
        "data_dir": str(dataset),
        "num_epochs": 1,
        "batch_size": 8,
        "model.backbone": "resnet18",
        "model.dims": 16,
        "eval.batch_size": 4,
        "seed": 3,
        **extra,
    }
    return [f"--config.{k}={v}" for k, v in values.items()]


def train_command(workdir, dataset, cache_dir, *, devices=1, extra_env=None, **extra):
    """(argv, env) of the real training command on `devices` simulated devices, sharing
    the tests' persistent compilation cache."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.update(extra_env or {})
    cmd = [
        sys.executable,
        "-m",
        "leopard_jax.train",
        "--config",
        str(DEMO_CONFIG),
        "--workdir",
        str(workdir),
        *overrides(dataset, **extra),
    ]
    return cmd, env


def start_train(workdir, dataset, cache_dir, **extra) -> subprocess.Popen:
    cmd, env = train_command(workdir, dataset, cache_dir, **extra)
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_train(workdir, dataset, cache_dir, *, check=True, **extra):
    cmd, env = train_command(workdir, dataset, cache_dir, **extra)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(workdir) -> list[dict]:
    return [
        json.loads(line)
        for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    ]


def final_params(workdir) -> dict[str, np.ndarray]:
    """Parameters of the run's last checkpoint (`latest`, not the best-by-DT5AP export)."""
    import orbax.checkpoint as ocp
    from flax import traverse_util

    latest = pathlib.Path(workdir).absolute() / "checkpoints" / "latest"
    (step_dir,) = [p for p in latest.iterdir() if p.name.isdigit()]
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(step_dir / "state")
    return traverse_util.flatten_dict(state["params"], sep="/")


def test_typo_in_config_key_is_an_error_before_compiling(tmp_path, dataset, cache_dir):
    proc = run_train(tmp_path / "w", dataset, cache_dir, check=False, **{"modle.dims": 8})
    assert proc.returncode != 0
    assert "modle" in proc.stderr


def test_bad_value_names_the_key(tmp_path, dataset, cache_dir):
    proc = run_train(tmp_path / "w", dataset, cache_dir, check=False, **{"loss.name": "cosfase"})
    assert proc.returncode == 2
    assert "config.loss.name" in proc.stderr and "cosfase" in proc.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_margin_function_names_come_from_the_losses_registry(tmp_path, dataset, cache_dir):
    """A typo fails with one line listing every name in losses.MARGIN_FUNCTIONS, before
    anything compiles; spotid_code passes validation (the run stops at the next check: a
    batch of 8 does not divide over 3 devices)."""
    typo = run_train(
        tmp_path / "w", dataset, cache_dir, check=False, **{"loss.margin_fn": "adaptiv"}
    )
    assert typo.returncode == 2
    (line,) = [line for line in typo.stderr.splitlines() if line.startswith("error:")]
    assert "config.loss.margin_fn" in line and "'adaptiv'" in line
    assert all(repr(name) in line for name in losses.MARGIN_FUNCTIONS)
    accepted = run_train(
        tmp_path / "w",
        dataset,
        cache_dir,
        devices=3,
        check=False,
        **{"loss.margin_fn": "spotid_code"},
    )
    assert accepted.returncode == 2
    assert "does not divide over 3 devices" in accepted.stderr
    assert "margin_fn" not in accepted.stderr


def test_batch_that_does_not_divide_over_devices_is_an_error(tmp_path, dataset, cache_dir):
    proc = run_train(tmp_path / "w", dataset, cache_dir, devices=3, check=False)
    assert proc.returncode == 2
    assert "does not divide over 3 devices" in proc.stderr


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, dataset, cache_dir):
    workdir = tmp_path_factory.mktemp("one_device")
    run_train(workdir, dataset, cache_dir, devices=1, num_epochs=2)
    return workdir


def test_one_and_two_devices_train_alike_through_the_cli(
    tmp_path, dataset, cache_dir, one_device_run
):
    """The whole command on 2 devices: same steps, same held-out start, losses close.
    (Adam's first steps are nearly sign(g): reduction-order noise in near-zero gradients
    becomes ±lr steps, so the CLI runs agree to ~1 %, not bit-wise; the step itself is
    checked exactly below.)"""
    run_train(tmp_path, dataset, cache_dir, devices=2, num_epochs=2)
    one, two = read_metrics(one_device_run), read_metrics(tmp_path)
    assert [r["epoch"] for r in one] == [r["epoch"] for r in two] == [0, 1, 2]
    assert [r["step"] for r in one] == [r["step"] for r in two]
    np.testing.assert_allclose(one[0]["test_DT5AP"], two[0]["test_DT5AP"], rtol=1e-6)
    for a, b in zip(one[1:], two[1:]):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=2e-2)


def test_train_step_on_two_devices_equals_one_device(dataset):
    """The pmapped step itself, stepwise, on the same global batches (SGD: exact)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(
        [
            sys.executable,
            str(pathlib.Path(__file__).with_name("multidevice_check.py")),
            str(dataset),
            "2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["losses_1"]) == 3
    np.testing.assert_allclose(result["losses_n"], result["losses_1"], rtol=1e-5)
    assert result["max_param_diff"] <= 1e-5 * result["max_param"]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, dataset, cache_dir, one_device_run):
    run_train(tmp_path, dataset, cache_dir, num_epochs=1)
    run_train(tmp_path, dataset, cache_dir, num_epochs=2)
    straight, resumed = final_params(one_device_run), final_params(tmp_path)
    for name in straight:
        np.testing.assert_allclose(straight[name], resumed[name], atol=1e-6, err_msg=name)
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1, 2]


def test_sigterm_saves_latest_and_the_rerun_ends_where_a_straight_run_ends(
    tmp_path, dataset, cache_dir, one_device_run
):
    """SIGTERM as soon as epoch 1 is logged (mid-epoch 2 when it lands in time): the run
    saves `latest` and exits 143; the rerun resumes mid-epoch and ends with the straight
    run's parameters either way."""
    proc = start_train(tmp_path, dataset, cache_dir, num_epochs=2)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and '"epoch": 1' in metrics.read_text():
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode in (0, 143), err[-4000:]
    if proc.returncode == 143:
        assert "interrupted: saved" in err and "rerun the same command to resume" in err
        run_train(tmp_path, dataset, cache_dir, num_epochs=2)
    straight, resumed = final_params(one_device_run), final_params(tmp_path)
    for name in straight:
        np.testing.assert_allclose(straight[name], resumed[name], atol=1e-6, err_msg=name)


def test_a_signal_at_an_epoch_end_exits_cleanly_and_the_rerun_ends_where_a_straight_run_ends(
    tmp_path, dataset, cache_dir, one_device_run
):
    """The moment the SIGTERM test above can only hit by chance: the signal lands just after
    the epoch's `latest` is queued. The run exits 143 without saving that step twice (orbax
    refuses a step it has), and the rerun finishes like the straight run."""
    cmd, env = train_command(tmp_path, dataset, cache_dir, num_epochs=2)
    cmd = [sys.executable, str(pathlib.Path(__file__).with_name("stop_at_epoch_end.py")), *cmd[3:]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 143, proc.stderr[-4000:]
    assert "interrupted: saved" in proc.stderr and "(epoch 2, step 0)" in proc.stderr
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1]
    run_train(tmp_path, dataset, cache_dir, num_epochs=2)
    straight, resumed = final_params(one_device_run), final_params(tmp_path)
    for name in straight:
        np.testing.assert_allclose(straight[name], resumed[name], atol=1e-6, err_msg=name)


def test_two_processes_train_to_equal_parameters(tmp_path, dataset, cache_dir):
    """jax.distributed with CPU collectives: two processes, one device each, one shared
    workdir; each dumps the parameters it ends with."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
    )
    worker = pathlib.Path(__file__).with_name("distributed_worker.py")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(worker),
                str(tmp_path),
                str(tmp_path / f"params{pid}.npz"),
                "--config",
                str(DEMO_CONFIG),
                *overrides(
                    dataset,
                    distributed=True,
                    coordinator_address=f"127.0.0.1:{port}",
                    num_processes=2,
                    process_id=pid,
                ),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    params0, params1 = np.load(tmp_path / "params0.npz"), np.load(tmp_path / "params1.npz")
    assert params0.files == params1.files and params0.files
    for name in params0.files:
        np.testing.assert_array_equal(params0[name], params1[name], err_msg=name)
    assert read_metrics(tmp_path)[-1]["step"] == 3  # 24 training images / global batch 8


def test_non_finite_losses_stop_the_run_with_a_clear_message(tmp_path, dataset, cache_dir):
    proc = run_train(
        tmp_path,
        dataset,
        cache_dir,
        check=False,
        **{"optim.learning_rate": 1e30, "max_bad_steps": 1, "num_epochs": 3},
    )
    assert proc.returncode == 2
    assert "non-finite" in proc.stderr


def test_a_run_stopped_mid_epoch_with_workers_leaks_no_shared_memory(tmp_path, dataset, cache_dir):
    """Two grain worker processes, SIGTERM once the first epoch's steps are under way: the
    run saves `latest`, stops its input stream and exits without leaked shared memory."""
    proc = start_train(tmp_path, dataset, cache_dir, num_epochs=3, workers=2)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and '"epoch": 0' in metrics.read_text():
            time.sleep(0.5)  # the stream's workers are up
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode in (0, 143), err[-4000:]
    assert "leaked shared_memory" not in err, err[-4000:]
