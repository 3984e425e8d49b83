"""Throughput of leopard_jax against a PyTorch/cv2 reference, measured in one process run.

    python scripts/bench.py [train|embed|embed_onnx|data|preprocess|local|input|layers|all]
        [--batch B] [--size H,W] [--json OUT] [--device cpu|gpu] [--dtype float32|bfloat16]
        [--steps N] [--u2netp U2NETP.onnx] [--yolox YOLOX_NANO.onnx] [--step-ms 206]

`embed_onnx` (scripts/bench_onnx.py) races the exported ONNX model in ONNX Runtime against
the same reference as `embed`; `local` (scripts/bench_local.py) and `input`
(scripts/bench_input.py: loader-only images/s, the real training loop with a stand-in step
of --step-ms as a fraction of the stand-in's rate, the epoch-boundary stall; batch 64 at
256×512 as its targets are stated) have no reference side and report their own figures;
`layers` (scripts/bench_layers.py) times B2's 3×3 and depthwise convolutions one by one,
forward and backward, against PyTorch's, summed per kind over a training step.

For each part both sides run in this process, alternating (leopard_jax k steps, reference
k steps, repeat) after warm-up, so a machine that is busy or throttles hurts both alike.
Reported: images/s of each side, the ratio leopard_jax / reference, compile time, peak RSS
(train and embed on a CPU: also each side run alone in a child process, `peak_rss_alone_mib`,
the memory figure to compare: in the shared process each side's peak includes the other's;
and `peak_rss_own_framework_mib`, each side alone with only its own framework imported, the
memory a user's process holds).

Why the bench refuses: a ratio between two programs that compute different things is
meaningless. Train and embed start from the same weights (random torch weights converted to
Flax), the same batch and the same class centres; the first step's shapes, dtype and loss
(train) or embeddings (embed) must agree within tolerance, else the ratio is withheld and
the reason printed. What each reference is, is written in its row (`reference` field):
  train, embed  scripts/bench_reference_torch.py: the spotID recipe in PyTorch, channels_last,
                eager, torch threads = the cores JAX sees (bf16: autocast on fp32 weights)
  data          a torch DataLoader over the same records and epoch table, same per-image code
  preprocess    the same step the spotID way: plain cv2 per image, rembg.remove
leopard_jax's side is its own code: `train.steps.train_step` on the state `train.state`
builds from `configs/default.py`, and `inference.embed_images`, the path `embed` and the
trainer's evaluation use. All inputs are made here (random batches and records, photos from
`leopard_jax.data.synthetic`); the rembg and detector stages run only on the ONNX files
passed with --u2netp / --yolox. `--device gpu` runs both frameworks on the first GPU (TF32
for float32, as each does by default on Ampere+); it stops with one line when JAX or torch
sees no GPU.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import pathlib
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import flags

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent))

from leopard_jax import cli  # noqa: E402  (after the path: runs from a checkout too)

PARTS = ("train", "embed", "embed_onnx", "data", "preprocess", "local", "input", "layers")
# data: long rounds, because a loader's read-ahead (up to a few batches made while the last
# drained batch was awaited) inflates short rounds; 6-batch rounds overstated grain 3x here.
DEFAULT_STEPS = {"train": 6, "embed": 10, "embed_onnx": 10, "data": 40, "preprocess": 8}
NUM_CLASSES = 882  # the paper's CosFace classes: 1191 training individuals less 309 singletons
# First-step agreement (same weights, batch, centres). fp32 differences come from conv
# algorithms and summation order; bf16 rounds every activation.
TOLERANCE = {
    "float32": {"loss": 2e-3, "embeddings": 2e-3},
    "bfloat16": {"loss": 5e-2, "embeddings": 5e-2},
    # GPU float32: both sides use TF32 tensor cores for convs and matmuls (10-bit mantissa)
    "tf32": {"loss": 2e-2, "embeddings": 2e-2},
    # the two loaders run the same per-image code on the same records: equal up to rounding
    "data": {"images": 1e-4, "labels": 0},
}

FLAGS = flags.FlagValues()
_BATCH = flags.DEFINE_integer("batch", 8, "images per step", lower_bound=1, flag_values=FLAGS)
_SIZE = flags.DEFINE_list("size", ["256", "512"], "input H,W (each >= 32)", flag_values=FLAGS)
_JSON = flags.DEFINE_string(
    "json", None, "write the results here (after every part)", flag_values=FLAGS
)
_DEVICE = flags.DEFINE_enum(
    "device", "cpu", ["cpu", "gpu"], "where both sides run", flag_values=FLAGS
)
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "compute precision", flag_values=FLAGS
)
_STEPS = flags.DEFINE_integer(
    "steps",
    None,
    f"timed steps per side (default per part: {DEFAULT_STEPS})",
    lower_bound=1,
    flag_values=FLAGS,
)
_ROUNDS = flags.DEFINE_integer(
    "rounds", 3, "alternations of the two sides", lower_bound=1, flag_values=FLAGS
)
_BACKBONE = flags.DEFINE_string(
    "backbone",
    "efficientnetv2_b2",
    "model of both sides: a name in leopard_jax.models.BACKBONES",
    flag_values=FLAGS,
)
_CLASSES = flags.DEFINE_integer(
    "classes", NUM_CLASSES, "CosFace classes", lower_bound=1, flag_values=FLAGS
)
_DIMS = flags.DEFINE_integer(
    "dims", 1024, "embedding dimensions of both sides", lower_bound=1, flag_values=FLAGS
)
_PEAK_OF = flags.DEFINE_enum(
    "peak-of",
    None,
    ["leopard_jax", "reference"],
    "train/embed only: run just this side for a few steps and print its peak RSS as JSON "
    "(how the parent measures each side's memory alone, in a process of its own)",
    flag_values=FLAGS,
)
_PEAK_OWN = flags.DEFINE_string(
    "peak-own",
    None,
    "with --peak-of: import only this side's framework (leopard_jax loads the converted "
    "weights from this model dir, written by the parent; the reference never imports JAX)",
    flag_values=FLAGS,
)
_THREADS = flags.DEFINE_integer(
    "threads", 0, "torch threads (0: the cores JAX sees)", lower_bound=0, flag_values=FLAGS
)
_STEP_MS = flags.DEFINE_float(
    "step-ms",
    206.0,
    "input part: the stand-in step's duration (the H200 bf16 rate scaled to 2 of 16 cores)",
    lower_bound=0.0,
    flag_values=FLAGS,
)
_U2NETP = flags.DEFINE_string(
    "u2netp", None, "u2netp .onnx: bench the rembg stage (skipped without)", flag_values=FLAGS
)
_YOLOX = flags.DEFINE_string(
    "yolox", None, "YOLOX-Nano .onnx: bench the detect stage (skipped without)", flag_values=FLAGS
)


class BenchError(SystemExit):
    """A bench that cannot run here (no CUDA, missing module, bad flag); one line says why."""

    def __init__(self, message: str):
        super().__init__(f"bench.py: {message}")


# ---------------------------------------------------------------- measurement


@dataclasses.dataclass
class Side:
    """One contestant of a part: `step()` does one unit of work and blocks until it is done."""

    label: str
    step: Callable[[], Any]
    images_per_step: int
    compile_s: float = 0.0
    reference: str = ""  # what this side is, in words (for the table/JSON)
    # Untimed, before each round (data loaders: a fresh iterator, its start-up batches
    # drained, so no batch made while the other side was timed counts for this one).
    start_round: Callable[[], None] = lambda: None
    end_round: Callable[[], None] = lambda: None


class RssSampler:
    """Peak resident memory per label, sampled in a thread (both sides share one process,
    so each figure includes the other side's resident weights; the process peak is exact)."""

    def __init__(self, interval_s: float = 0.02):
        import psutil

        self._process = psutil.Process()
        self._interval = interval_s
        self._label: str | None = None
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        label = self._label
        if label is not None:
            rss = self._process.memory_info().rss
            self.peak[label] = max(self.peak.get(label, 0), rss)

    def set(self, label: str | None) -> None:
        self._label = label
        self.sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def process_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def own_peak_rss_mib() -> float:
    """This address space's peak RSS (VmHWM), where Linux has it: unlike ru_maxrss, which
    a child started with fork + exec inherits from its parent, VmHWM starts afresh at exec."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return process_peak_rss_mib()


def peak_alone_argv(part: str, label: str, cfg: Config, own: str | None = None) -> list[str]:
    """The command line of a child that runs one side of `part` alone (`--peak-of`), with
    only its own framework imported when `own` names the weights' dir (`--peak-own`)."""
    return [
        sys.executable,
        str(pathlib.Path(__file__).resolve()),
        part,
        f"--peak-of={label}",
        f"--batch={cfg.batch}",
        f"--size={cfg.height},{cfg.width}",
        f"--device={cfg.device}",
        f"--dtype={cfg.dtype}",
        f"--backbone={cfg.backbone}",
        f"--dims={cfg.dims}",
        f"--classes={cfg.num_classes}",
        f"--threads={cfg.threads}",
        *([f"--peak-own={own}"] if own else []),
    ]


def peaks_alone(part: str, cfg: Config, own: str | None = None) -> dict:
    """Peak RSS (MiB) of each side of train/embed run alone, in a child process of its own,
    and their ratio.

    Why: in the timing run both sides share one process, so each side's sampled peak
    includes the other's resident memory and the allocator's leftovers (in one run the
    sampled peaks were 8005 and 7962 MiB; alone, the same two steps peaked at 6239 and
    3021). Each child imports both frameworks and builds the same weights, then keeps only
    its side's copy of them (`side_weights`), so what differs between the two figures is the
    side's own step: compile, activations, buffers.
    `own` (`peaks_own_framework`) makes each child import only its own framework instead.
    """
    import subprocess

    peaks = {}
    for label in ("leopard_jax", "reference"):
        done = subprocess.run(
            peak_alone_argv(part, label, cfg, own), capture_output=True, text=True, check=False
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode or not lines:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"{part} --peak-of {label} failed: {last}")
        peaks[label] = json.loads(lines[-1])["peak_rss_mib"]
    peaks["ratio"] = round(peaks["leopard_jax"] / peaks["reference"], 3)
    return peaks


def peaks_own_framework(part: str, cfg: Config, models: Models) -> dict:
    """`peaks_alone` with each child importing only its own framework: the memory a user's
    process holds (torch and timm alone are ~700 MiB resident, JAX, flax and optax ~220).
    leopard_jax's child loads `models`' converted weights from a model dir written here, so
    it never imports torch; the reference's child builds its model from the seed
    (`reference_models`, as `build_models` does) and never imports JAX."""
    import tempfile

    from leopard_jax import model_io

    with tempfile.TemporaryDirectory(prefix="bench_weights_") as tmp:
        weights = pathlib.Path(tmp) / "model"
        model_io.save_model(weights, models.variables, {"info": {"source": "bench"}})
        np.save(weights / "centers.npy", models.centers)
        return peaks_alone(part, cfg, own=str(weights))


def own_framework_models(label: str, cfg: Config, weights: str) -> Models:
    """The child of `peaks_own_framework`'s `Models`, with only `label`'s framework
    imported (checked: the run stops if the other one was)."""
    if label == "leopard_jax":
        import jax

        from leopard_jax import model_io

        jax.config.update("jax_default_device", jax_device(cfg))
        _, variables = model_io.load_model(weights)
        models = Models(None, variables, np.load(pathlib.Path(weights) / "centers.npy"))
    else:
        import torch

        torch.set_num_threads(cfg.threads or cores())
        models = reference_models(cfg)
    other = "torch" if label == "leopard_jax" else "jax"
    if other in sys.modules:
        raise BenchError(f"--peak-own: the {label} side imported {other}")
    return models


def run_side_alone(
    part: str, label: str, cfg: Config, steps: int = 3, own: str | None = None
) -> dict:
    """The child of `peaks_alone`: one side of train/embed, `steps` steps (the first
    compiles), then this process's peak RSS."""
    if own:
        models = own_framework_models(label, cfg, own)
    else:
        setup_devices(cfg)
        models = side_weights(build_models(cfg), label)
        release_heap()
    if part == "train":
        images, labels = synthetic_batch(cfg)
        if label == "leopard_jax":
            jax_train = JaxTrain(models, cfg, images, labels)
            models = None  # the step's state holds the weights now
            release_heap()
            side, _ = jax_train.side(last=True)
        else:
            side, _ = torch_train_side(models, cfg, images, labels)
    elif part == "embed":
        images = synthetic_images(cfg)
        if label == "leopard_jax":
            side, _ = jax_embed_side(models, cfg, images, last=True)
        else:
            side, _ = torch_embed_side(models, cfg, images)
    else:
        raise BenchError(f"--peak-of measures train or embed, not {part}")
    for _ in range(steps):
        side.step()
    return {"part": part, "side": label, "peak_rss_mib": round(own_peak_rss_mib(), 1)}


def side_weights(models: Models, label: str) -> Models:
    """`models` with only `label`'s copy of the weights: the converted variables for
    leopard_jax, the torch model for the reference. A side run alone then holds its own
    weights only (the other copy was ~45 MB of B2 in each child, and the peaks compare the
    sides' steps)."""
    other = {"torch_model": None} if label == "leopard_jax" else {"variables": None}
    return dataclasses.replace(models, **other)


def release_heap() -> None:
    """Free what nothing references and hand the heap's free pages back to the OS (glibc
    keeps freed chunks resident until trimmed), so a dropped copy lowers the peak after."""
    from leopard_jax import heap

    gc.collect()
    heap.release()


def time_alternating(
    sides: list[Side], *, steps: int, rounds: int, warmup: int = 1
) -> dict[str, dict]:
    """Warm each side up, then `rounds` times run every side for steps/rounds steps in turn."""
    per_round = max(1, steps // rounds)
    with RssSampler() as rss:
        for side in sides if warmup else ():
            rss.set(side.label)
            side.start_round()
            for _ in range(warmup):
                side.step()
            side.end_round()
        times: dict[str, list[float]] = {side.label: [] for side in sides}
        for _ in range(rounds):
            for side in sides:
                rss.set(side.label)
                side.start_round()
                start = time.perf_counter()
                for _ in range(per_round):
                    side.step()
                times[side.label].append(time.perf_counter() - start)
                side.end_round()
        rss.set(None)
    out = {}
    for side in sides:
        rates = [side.images_per_step * per_round / t for t in times[side.label]]
        total = sum(times[side.label])
        out[side.label] = {
            "images_per_s": side.images_per_step * per_round * rounds / total,
            "images_per_s_rounds": [round(r, 3) for r in rates],
            "steps": per_round * rounds,
            "step_s_median": statistics.median(t / per_round for t in times[side.label]),
            "compile_s": round(side.compile_s, 2),
            "peak_rss_mib": round(rss.peak.get(side.label, 0) / 2**20, 1),
            "reference": side.reference,
        }
    return out


def first_step_disagreement(ours: dict, ref: dict, tolerance: dict[str, float]) -> list[str]:
    """Why the two first steps are not the same computation ([] when they are).

    Both dicts may hold: "shape" (input, NHWC), "dtype" (compute dtype), "out_shape",
    "loss" (float) and "embeddings" (array [B, D])."""
    reasons = []
    for key in ("shape", "dtype", "out_shape"):
        if key in ours or key in ref:
            if ours.get(key) != ref.get(key):
                reasons.append(
                    f"{key} differs: leopard_jax {ours.get(key)} vs reference {ref.get(key)}"
                )
    if "loss" in ours or "loss" in ref:
        a, b = ours.get("loss"), ref.get("loss")
        if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)):
            reasons.append(f"first loss not comparable: leopard_jax {a} vs reference {b}")
        elif abs(a - b) > tolerance["loss"] * max(1.0, abs(b)):
            reasons.append(
                f"first-step loss differs: leopard_jax {a:.6g} vs reference {b:.6g} "
                f"(|diff| {abs(a - b):.3g} > {tolerance['loss']:.0e}·max(1,|ref|))"
            )
    for key in ("embeddings", "images", "labels"):
        if key not in ours and key not in ref:
            continue
        a, b = ours.get(key), ref.get(key)
        if a is None or b is None or np.shape(a) != np.shape(b):
            reasons.append(f"{key} not comparable: shapes {np.shape(a)} vs {np.shape(b)}")
            continue
        diff = float(
            np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0)
        )
        if not diff <= tolerance[key]:
            reasons.append(f"first {key} differ: max |diff| {diff:.3g} > {tolerance[key]:.0e}")
    return reasons


def compare(
    part: str,
    ours: Side,
    ref: Side,
    check: list[str],
    cfg: Config,
    *,
    note: str = "",
    warmup: int = 1,
) -> dict:
    """Time the two sides and build the part's result; the ratio only when `check` is empty."""
    steps = cfg.steps or DEFAULT_STEPS[part]
    rounds = min(cfg.rounds, steps)
    timing = time_alternating([ours, ref], steps=steps, rounds=rounds, warmup=warmup)
    a, b = timing[ours.label], timing[ref.label]
    result = {
        "part": part,
        "leopard_jax": a,
        "reference": b,
        "ratio": round(a["images_per_s"] / b["images_per_s"], 3) if not check else None,
        "same_computation": not check,
        "refused_because": check,
        "process_peak_rss_mib": round(process_peak_rss_mib(), 1),
    }
    if note:
        result["note"] = note
    return result


# ---------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int = 8
    height: int = 256
    width: int = 512
    device: str = "cpu"
    dtype: str = "float32"
    steps: int | None = None
    rounds: int = 3
    backbone: str = "efficientnetv2_b2"
    dims: int = 1024
    num_classes: int = NUM_CLASSES
    threads: int = 0  # torch intra-op threads; 0 = the cores JAX sees
    seed: int = 0
    u2netp: str | None = None  # ONNX files of the preprocess model stages; None: skipped
    yolox: str | None = None


def model_tolerance(cfg: Config) -> dict[str, float]:
    return TOLERANCE["tf32" if cfg.device == "gpu" and cfg.dtype == "float32" else cfg.dtype]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def setup_devices(cfg: Config) -> dict:
    """Pin JAX and torch to the asked device; fail in one line when it is absent."""
    import jax
    import torch

    if cfg.device == "gpu":
        try:
            jax_device = jax.devices("gpu")[0]
        except RuntimeError as e:
            raise BenchError(
                f"--device gpu: JAX has no GPU backend ({e}); "
                "install jax with CUDA or use --device cpu"
            ) from e
        if not torch.cuda.is_available():
            raise BenchError(
                "--device gpu: torch.cuda.is_available() is False; "
                "install a CUDA torch or use --device cpu"
            )
        # Each framework's fast GPU float32: TF32 tensor cores (XLA's default on GPU, set here
        # for torch, whose matmul default is full fp32), cuDNN autotuning.
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch_device = "cuda"
    else:
        jax_device = jax.devices("cpu")[0]
        torch_device = "cpu"
    threads = cfg.threads or cores()
    torch.set_num_threads(threads)
    jax.config.update("jax_default_device", jax_device)
    return {
        "jax_device": str(jax_device),
        "jax_local_devices": jax.local_device_count(),
        "torch_device": torch.cuda.get_device_name(0) if torch_device == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "cores": cores(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # with leopard_jax.xla_flags' own
    }


def jax_device(cfg: Config):
    """The one device the train part runs on (as `setup_devices` chose it)."""
    import jax

    return jax.devices(cfg.device)[0]


def timm_name(backbone: str) -> str:
    """leopard_jax backbone names follow timm's `tf_` ports (TF 'same' padding, BN eps 1e-3)."""
    return backbone if backbone.startswith("resnet") else f"tf_{backbone}"


def synthetic_images(cfg: Config) -> np.ndarray:
    """A fixed uint8 [B, H, W, 4] batch (throughput does not depend on content)."""
    rng = np.random.default_rng(cfg.seed)
    return rng.integers(0, 256, (cfg.batch, cfg.height, cfg.width, 4), dtype=np.uint8)


def synthetic_batch(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """The training input: `synthetic_images` normalised as the loader does, and labels."""
    from leopard_jax.data import augment

    labels = np.random.default_rng(cfg.seed + 1).integers(0, cfg.num_classes, cfg.batch)
    return augment.normalize(synthetic_images(cfg)), labels.astype(np.int32)


# ---------------------------------------------------------------- train and embed


@dataclasses.dataclass
class Models:
    """The torch reference and the same weights as Flax variables (numpy leaves)."""

    torch_model: Any
    variables: dict
    centers: np.ndarray


def build_models(cfg: Config) -> Models:
    reference = reference_models(cfg)
    variables = torch_to_flax(reference.torch_model)
    reference.torch_model.to("cuda" if cfg.device == "gpu" else "cpu")
    return Models(reference.torch_model, variables, reference.centers)


def reference_models(cfg: Config) -> Models:
    """The torch reference (on the CPU) and the class centres from `cfg.seed`; no
    variables yet. Imports torch only."""
    import bench_reference_torch as ref

    torch_model = ref.build(
        backbone=timm_name(cfg.backbone), dims=cfg.dims, device="cpu", seed=cfg.seed
    )
    return Models(torch_model, None, ref.init_centers(cfg.num_classes, cfg.dims, cfg.seed))


def torch_to_flax(torch_model) -> dict:
    """{"params", "batch_stats"} of EmbeddingModel(head="spotid") from the reference's
    weights, through the importer a real spotID checkpoint goes through."""
    from leopard_jax.models import convert

    state = convert.normalize_state_dict(torch_model.state_dict(), "bench reference")
    variables, _ = convert.convert_spotid(state, torch_model.backbone_name, where="bench reference")
    return variables


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def train_config(cfg: Config):
    """configs/default.py (the paper's setting) with the bench's model; drop-path off,
    because two random drop masks would make the first losses differ."""
    from configs import default

    config = default.get_config()
    config.seed = cfg.seed
    config.model.backbone = cfg.backbone
    config.model.head = "spotid"
    config.model.dims = cfg.dims
    config.model.drop_path_rate = 0.0
    config.model.dtype = cfg.dtype
    return config


class JaxTrain:
    """leopard_jax's own training step (`train.steps.train_step`, pmapped over
    `parallel.AXIS` as the loop does, on one device), compiled once ahead as the loop
    compiles it (`parallel.compile_ahead`); each `side()` starts from the state
    `train.state.init_state` makes of the converted weights. `side(last=True)` then drops
    that host copy, so the step's state is the only one left, as the reference's model and
    optimiser are: the peak of a side run alone counted a spare copy otherwise."""

    def __init__(self, models: Models, cfg: Config, images: np.ndarray, labels: np.ndarray):
        import functools

        import jax
        import jax.numpy as jnp

        from leopard_jax import parallel
        from leopard_jax.train import state as state_lib
        from leopard_jax.train import steps

        self.cfg, self.config = cfg, train_config(cfg)
        self.devices = [jax_device(cfg)]
        self.model = state_lib.build_model(self.config.model)
        self.tx = state_lib.make_optimizer(self.config, steps_per_epoch=1000)
        state = state_lib.init_state(
            self.config,
            self.model,
            num_classes=cfg.num_classes,
            input_shape=images.shape[1:],
            tx=self.tx,
            init_variables=models.variables,
        )
        params = {**state.params, "centers": jnp.asarray(models.centers)}  # torch's centres
        self.initial = jax.device_get(state.replace(params=params, opt_state=self.tx.init(params)))
        # One device: its share of the batch is the whole batch.
        batch = {"image": images, "label": labels, "mask": np.ones(len(labels), bool)}
        self.batch = parallel.replicate(batch, self.devices)
        self.epoch = parallel.replicate(np.int32(0), self.devices)
        p_train = jax.pmap(
            functools.partial(
                steps.train_step, model=self.model, tx=self.tx, loss_config=self.config.loss
            ),
            axis_name=parallel.AXIS,
            donate_argnums=(0,),
            devices=self.devices,
        )
        start = time.perf_counter()
        self.compiled = parallel.compile_ahead(p_train, self.fresh_state(), self.batch, self.epoch)
        self.compile_s = time.perf_counter() - start

    def fresh_state(self):
        from leopard_jax import parallel

        return parallel.replicate(self.initial, self.devices)

    def side(self, last: bool = False) -> tuple[Side, dict]:
        if self.initial is None:
            raise BenchError("JaxTrain.side(last=True) was called before; build another")
        state = self.fresh_state()
        if last:
            self.initial = None
        state, logs = self.compiled(state, self.batch, self.epoch)
        first = {
            "loss": float(logs["loss"][0]),
            "shape": tuple(self.batch["image"].shape[1:]),
            "dtype": self.cfg.dtype,
            "out_shape": (self.batch["image"].shape[1], self.config.model.dims),
        }
        holder = [state]

        def step():
            holder[0], logs = self.compiled(holder[0], self.batch, self.epoch)
            logs["loss"].block_until_ready()

        what = (
            "leopard_jax train.steps.train_step (pmap, 1 device): "
            "EmbeddingModel + cosface_loss + Adam"
        )
        return Side("leopard_jax", step, self.cfg.batch, self.compile_s, what), first


def torch_train_side(
    models: Models, cfg: Config, images: np.ndarray, labels: np.ndarray, *, adaptive: bool = True
) -> tuple[Side, dict]:
    """The reference training step from the same weights (a fresh copy of the torch model)."""
    import copy

    import bench_reference_torch as ref
    import torch

    device = next(models.torch_model.parameters()).device
    model = copy.deepcopy(models.torch_model)
    centers = torch.tensor(models.centers, device=device)
    dtype = _torch_dtype(cfg.dtype)
    x = ref.to_device_images(images, device)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    loss_kw = (
        {} if adaptive else {"loss_fn": lambda e, c, t: ref.cosface_loss(e, c, t, adaptive=False)}
    )
    train_step = ref.make_train_step(model, centers, dtype=dtype, **loss_kw)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loss = train_step(x, y)
    first = {
        "loss": float(loss),
        "shape": tuple(x.permute(0, 2, 3, 1).shape),
        "dtype": str(dtype).removeprefix("torch."),
        "out_shape": (x.shape[0], model.embedding_layer.out_features),
    }

    def step():
        train_step(x, y)
        sync()

    what = (
        f"PyTorch {torch.__version__} timm {timm_name(cfg.backbone)} channels_last eager "
        "+ CosFace(adaptive) + Adam"
    )
    return Side("reference", step, cfg.batch, 0.0, what), first


def train_part(cfg: Config, models: Models, jax_train: JaxTrain | None = None) -> dict:
    images, labels = synthetic_batch(cfg)
    jax_train = jax_train or JaxTrain(models, cfg, images, labels)
    ours, ours_first = jax_train.side()
    ref, ref_first = torch_train_side(models, cfg, images, labels)
    check = first_step_disagreement(ours_first, ref_first, model_tolerance(cfg))
    result = compare(
        "train", ours, ref, check, cfg, note="same batch every step (data loading timed in `data`)"
    )
    result["first_loss"] = {"leopard_jax": ours_first["loss"], "reference": ref_first["loss"]}
    return result


def jax_embed_side(
    models: Models, cfg: Config, images: np.ndarray, *, last: bool = False
) -> tuple[Side, dict]:
    """leopard_jax inference as `embed` runs it: `inference.embed_images` on uint8 images
    (stacked, sent to the local devices, normalised and embedded there), with the weights
    sent to the devices once. `last=True` then drops `models`' host copy of them, as `embed`
    keeps only the devices' copy."""
    import jax

    from leopard_jax import inference, parallel
    from leopard_jax.train import state as state_lib

    model = state_lib.build_model(train_config(cfg).model, axis_name=None)
    variables = parallel.replicate(models.variables)
    if last:
        models.variables = None

    def step() -> np.ndarray:
        return inference.embed_images(
            model, variables, images, batch_size=len(images), replicated=True
        )

    start = time.perf_counter()
    out = step()
    first_call_s = time.perf_counter() - start
    first = {
        "shape": tuple(images.shape),
        "dtype": cfg.dtype,
        "out_shape": tuple(out.shape),
        "embeddings": out,
    }
    what = (
        f"leopard_jax inference.embed_images (uint8 in, pmap over {jax.local_device_count()} "
        "local device(s)); compile_s = the first call"
    )
    return Side("leopard_jax", step, len(images), first_call_s, what), first


def torch_embed_side(models: Models, cfg: Config, images: np.ndarray) -> tuple[Side, dict]:
    """The reference inference on the same uint8 images, also normalised on its device."""
    import bench_reference_torch as ref
    import torch

    device = next(models.torch_model.parameters()).device
    dtype = _torch_dtype(cfg.dtype)
    embed = ref.make_embed(models.torch_model, dtype=dtype)
    x = ref.normalized_device_images(images, device)
    out = embed(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = {
        "shape": tuple(x.permute(0, 2, 3, 1).shape),
        "dtype": str(dtype).removeprefix("torch."),
        "embeddings": out.float().cpu().numpy(),
        "out_shape": tuple(out.shape),
    }

    def step():
        embed(ref.normalized_device_images(images, device)).cpu()
        sync()

    what = (
        f"PyTorch {torch.__version__} timm {timm_name(cfg.backbone)} channels_last eval, "
        "inference_mode (uint8 in, normalised on its device)"
    )
    return Side("reference", step, cfg.batch, 0.0, what), first


def embed_part(cfg: Config, models: Models) -> dict:
    images = synthetic_images(cfg)
    ours, ours_first = jax_embed_side(models, cfg, images)
    ref, ref_first = torch_embed_side(models, cfg, images)
    check = first_step_disagreement(ours_first, ref_first, model_tolerance(cfg))
    result = compare("embed", ours, ref, check, cfg)
    a, b = ours_first["embeddings"], ref_first["embeddings"]
    result["first_embeddings_max_abs_diff"] = (
        float(np.abs(a - b).max()) if a.shape == b.shape else None
    )
    return result


# ---------------------------------------------------------------- data


def synthetic_dataset(directory: pathlib.Path, cfg: Config, num_records: int) -> list[dict]:
    """A dataset dir of random uint8 H×W×4 records, 4 per identity (loader cost does not
    depend on pixel values; the records are raw bytes, as preprocess writes them)."""
    from leopard_jax.data import records

    rng = np.random.default_rng(cfg.seed)
    records.save_settings(directory, {"height": cfg.height, "width": cfg.width, "channels": 4})
    base = rng.integers(0, 256, (cfg.height, cfg.width, 4), dtype=np.uint8)
    items = (
        (
            {"key": f"id{i // 4:04d}/{i}", "identity": f"id{i // 4:04d}"},
            np.roll(base, 7 * i, axis=1),
        )
        for i in range(num_records)
    )
    records.write_records(directory, "bench", items)
    return records.read_manifest(directory)


class LoaderSide:
    """A loader timed in rounds, each on a fresh iterator that is closed afterwards, so the
    loaders never run at the same time. Each round first drains, untimed, more batches than
    either loader buffers (grain: 2 queued + 4 read-ahead per worker; torch: 2 per worker),
    so the timed batches are made at the steady rate, none during worker start-up."""

    def __init__(self, open_iterator: Callable[[], Any], workers: int):
        self.open_iterator, self.iterator = open_iterator, None
        self.drain = loader_drain(workers)

    def start_round(self) -> None:
        self.iterator = self.open_iterator()
        for _ in range(self.drain):
            next(self.iterator)

    def step(self):
        return next(self.iterator)

    def end_round(self) -> None:
        close = getattr(self.iterator, "close", None) or getattr(
            self.iterator, "_shutdown_workers", None
        )
        if close:
            close()
        self.iterator = None

    def first(self) -> tuple[dict, float]:
        """The first batch of a fresh iterator, and the time it took (start-up)."""
        start = time.perf_counter()
        iterator = self.open_iterator()
        batch = next(iterator)
        elapsed = time.perf_counter() - start
        self.iterator = iterator
        self.end_round()
        images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
        return {
            "shape": tuple(images.shape),
            "dtype": str(images.dtype),
            "images": images,
            "labels": labels,
        }, elapsed

    def side(self, label: str, batch: int, what: str) -> tuple[Side, dict]:
        first, startup = self.first()
        return Side(label, self.step, batch, startup, what, self.start_round, self.end_round), first


def loader_drain(workers: int) -> int:
    return 1 + 6 * max(1, workers)


def data_part(cfg: Config, workers: int = 2) -> dict:
    """grain `train_loader` vs a torch DataLoader over the same records and epoch table."""
    import bench_reference_torch as ref
    import torch
    from absl import flags

    from leopard_jax.data import pipeline, records

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
        flags.FLAGS(sys.argv[:1])
    steps = cfg.steps or DEFAULT_STEPS["data"]
    rounds = min(cfg.rounds, 2, steps)  # each round starts worker processes: seconds each
    cfg = dataclasses.replace(cfg, steps=steps, rounds=rounds)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        batches = steps // rounds + loader_drain(workers) + 1
        rows = synthetic_dataset(pathlib.Path(tmp), cfg, num_records=cfg.batch * batches)

        def open_ours():
            return pipeline.train_loader(
                rows,
                tmp,
                global_batch=cfg.batch,
                seed=cfg.seed,
                epoch=0,
                num_devices=1,
                worker_count=workers,
            ).iterator

        table = pipeline.train_table(
            rows, global_batch=cfg.batch, seed=cfg.seed, epoch=0, num_devices=1
        ).ravel()
        labels = pipeline.label_array(rows, pipeline.class_names(rows, keep_singletons=False))
        dataset = ref.RecordDataset(
            records.RecordSource(tmp, rows), table, labels, seed=cfg.seed, epoch=0
        )

        def open_reference():
            return iter(ref.make_loader(dataset, cfg.batch, workers))

        ours, ours_first = LoaderSide(open_ours, workers).side(
            "leopard_jax",
            cfg.batch,
            f"leopard_jax.data.pipeline.train_loader (grain, {workers} worker processes)",
        )
        theirs, ref_first = LoaderSide(open_reference, workers).side(
            "reference",
            cfg.batch,
            f"torch {torch.__version__} DataLoader ({workers} spawned workers) "
            "over the same records and epoch "
            "table, same per-image augment + normalise (leopard_jax.data.augment)",
        )
        check = first_step_disagreement(ours_first, ref_first, TOLERANCE["data"])
        return compare(
            "data",
            ours,
            theirs,
            check,
            cfg,
            warmup=0,
            note="compile_s = time to the first batch of a fresh iterator (worker start-up); "
            "each round "
            f"opens a fresh iterator per side, drains {loader_drain(workers)} batches untimed, "
            "times the next ones, and closes it",
        )


# ---------------------------------------------------------------- preprocess


def preprocess_inputs(
    cfg: Config, count: int = 8
) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """(leopard crops, whole camera-trap photos, where they came from), all RGB, rendered by
    `leopard_jax.data.synthetic` at typical sizes (a stage's cost depends on the size, and on
    content only as real photos have it: a textured animal in a cluttered scene)."""
    import cv2

    from leopard_jax.data import synthetic

    def rgb(height: int, width: int, n: int, seed: int) -> list[np.ndarray]:
        return [
            cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            for *_, bgr in synthetic.photos(n, 1, seed, height, width)
        ]

    crops, photos = rgb(360, 720, count, cfg.seed), rgb(600, 800, 3, cfg.seed + 1)
    return (
        crops,
        photos,
        f"{len(crops)} crops and {len(photos)} photos from leopard_jax.data.synthetic",
    )


def cycling(fn: Callable[[np.ndarray], Any], images: list[np.ndarray]) -> Callable[[], Any]:
    """A step that processes the next image of `images`, round and round."""
    position = [0]

    def step():
        image = images[position[0] % len(images)]
        position[0] += 1
        return fn(image)

    return step


def stage_result(
    name: str,
    cfg: Config,
    steps: int,
    ours: Callable,
    theirs: Callable | None,
    images,
    *,
    what_ours: str,
    what_ref: str,
    agree: Callable[[Any, Any], list[str]] | None,
    note: str,
) -> dict:
    """Time one preprocessing stage per image; without a reference, leopard_jax alone."""
    cfg = dataclasses.replace(cfg, steps=steps)
    first_ours = ours(images[0])
    ours_side = Side("leopard_jax", cycling(ours, images), 1, 0.0, what_ours)
    if theirs is None:
        timing = time_alternating([ours_side], steps=steps, rounds=min(cfg.rounds, steps))
        return {
            "part": f"preprocess/{name}",
            "leopard_jax": timing["leopard_jax"],
            "reference": None,
            "ratio": None,
            "same_computation": None,
            "refused_because": [f"no reference: {what_ref}"],
            "process_peak_rss_mib": round(process_peak_rss_mib(), 1),
            "note": note,
        }
    check = agree(first_ours, theirs(images[0]))
    result = compare(
        f"preprocess/{name}",
        ours_side,
        Side("reference", cycling(theirs, images), 1, 0.0, what_ref),
        check,
        cfg,
        note=note,
    )
    return result


def _same_array(tolerance: float) -> Callable[[np.ndarray, np.ndarray], list[str]]:
    def agree(a, b) -> list[str]:
        return first_step_disagreement(
            {"shape": a.shape, "dtype": str(a.dtype), "images": a},
            {"shape": b.shape, "dtype": str(b.dtype), "images": b},
            {"images": tolerance},
        )

    return agree


def preprocess_part(cfg: Config) -> list[dict]:
    """Per-stage images/s of leopard_jax.preprocess against the same step done the original
    spotID way (plain cv2 per image; rembg.remove), on synthetic crops and photos."""
    import bench_reference_torch as ref
    import cv2
    import rembg

    from leopard_jax.preprocess import background, detect, edges, render

    threads = cfg.threads or cores()
    cv2.setNumThreads(threads)
    crops, photos, source = preprocess_inputs(cfg)
    model_steps = cfg.steps or DEFAULT_STEPS["preprocess"]
    cv2_steps = 8 * model_steps
    results = []

    spotid_edges = dict(equalize=False, blur_ksize=5, canny_low=55, canny_high=160)
    results.append(
        stage_result(
            "edges",
            cfg,
            cv2_steps,
            lambda rgb: edges.edge_map(rgb, **spotid_edges),
            ref.edges_cv2,
            crops,
            what_ours="leopard_jax.preprocess.edges.edge_map(equalize=False), spotID's settings",
            what_ref="cv2 grey -> GaussianBlur 5x5 -> Canny(55, 160) per image "
            "(spotID's edge step)",
            agree=_same_array(0),
            note=f"{source}; the default edge_map also equalises the histogram (not timed here)",
        )
    )

    edge_maps = {id(c): ref.edges_cv2(c) for c in crops}
    results.append(
        stage_result(
            "render",
            cfg,
            cv2_steps,
            lambda rgb: render.render(rgb, edge_maps[id(rgb)], cfg.height, cfg.width),
            lambda rgb: ref.render_cv2(rgb, edge_maps[id(rgb)], cfg.height, cfg.width),
            crops,
            what_ours="leopard_jax.preprocess.render.render (stretch)",
            what_ref="cv2.resize of RGB and of the edge map, then stack, per image",
            agree=_same_array(1),
            note=f"{source}; to {cfg.height}x{cfg.width}x4",
        )
    )

    if cfg.u2netp:
        session = background.new_session(cfg.u2netp, threads=threads)

        def ours_rembg(rgb):
            mask = background.predict_mask(session, rgb)
            return background.apply_mask(rgb, mask), mask

        def rembg_alpha(a, b) -> list[str]:
            return _same_array(1)(a[1], b[..., 3])

        results.append(
            stage_result(
                "rembg",
                cfg,
                model_steps,
                ours_rembg,
                lambda rgb: rembg.remove(rgb, session=session),
                crops,
                what_ours="leopard_jax.preprocess.background predict_mask + apply_mask "
                "(u2netp, ONNX Runtime)",
                what_ref="rembg.remove(crop, session=the same u2netp session) per image, "
                "as spotID calls it",
                agree=rembg_alpha,
                note=f"{source}; {threads} ONNX threads; check: ours' mask = rembg's alpha",
            )
        )
    else:
        results.append({"part": "preprocess/rembg", "skipped": "no --u2netp U2NETP.onnx given"})

    if cfg.yolox:
        detector = detect.Detector(cfg.yolox, threads=threads)
        results.append(
            stage_result(
                "detect",
                cfg,
                model_steps,
                detector,
                None,
                photos,
                what_ours=f"leopard_jax.preprocess.detect.Detector "
                f"(YOLOX-Nano ONNX, {threads} threads)",
                what_ref="no same-model reference here (spotID's example data come pre-cropped); "
                "leopard_jax alone",
                agree=None,
                note=source,
            )
        )
    else:
        results.append({"part": "preprocess/detect", "skipped": "no --yolox YOLOX_NANO.onnx given"})
    return results


# ---------------------------------------------------------------- report


def embed_onnx_part(cfg: Config) -> dict:
    """`embed` with ONNX Runtime on the exported model as leopard_jax's side (CPU, fp32)."""
    if cfg.device != "cpu" or cfg.dtype != "float32":
        return {"part": "embed_onnx", "skipped": "ONNX Runtime runs float32 on the CPU only"}
    import bench_onnx

    return bench_onnx.embed_onnx_part(cfg)


def input_part(cfg: Config) -> dict:
    """The input path's own figures: loader-only images/s, end-to-end fraction of a
    stand-in step's rate over 3 epochs, the epoch-boundary stall."""
    import bench_input

    del cfg  # batch 64 at 256×512 with the machine's cores, as its targets are stated
    return {"part": "input", "figures": bench_input.input_part(step_ms=_STEP_MS.value)}


def local_part(cfg: Config) -> dict:
    """The local-feature matcher's own figures (no reference side): extraction ms per crop
    per core, matching + verification ms per pair, re-ranking 1000 queries × top-20."""
    import bench_local

    del cfg  # fixed 256×512 crops and a 1000 × 20 re-ranking, as its targets are stated
    return {"part": "local", "figures": bench_local.bench_local(queries=1000, top_k=20)}


def layers_part(cfg: Config) -> dict:
    """B2's 3×3 and depthwise convolutions one by one, forward and backward, against
    PyTorch's at the training step's shapes (`bench_layers`): where the step's gap is."""
    import bench_layers

    figures, rows = bench_layers.bench_layers(cfg.batch, cfg.height, cfg.width)
    return {"part": "layers", "figures": figures, "layers": rows}


def table(results: list[dict]) -> str:
    head = (
        f"{'part':<22}{'leopard_jax img/s':>18}{'reference img/s':>17}{'ratio':>9}"
        f"{'compile s':>11}{'proc RSS MiB':>14}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['part']:<22}skipped: {r['skipped']}")
            continue
        if "figures" in r:
            lines.append(
                f"{r['part']:<22}" + ", ".join(f"{k} {v}" for k, v in r["figures"].items())
            )
            continue
        a, b = r["leopard_jax"], r["reference"]
        ref_rate = f"{b['images_per_s']:>17.2f}" if b else f"{'-':>17}"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else ("REFUSED" if b else "n/a")
        lines.append(
            f"{r['part']:<22}{a['images_per_s']:>18.2f}{ref_rate}{ratio:>9}"
            f"{a['compile_s']:>11.1f}{r['process_peak_rss_mib']:>14.0f}"
        )
        for reason in r["refused_because"]:
            lines.append(f"    {'refused' if b else 'note'}: {reason}")
    lines.append("")
    for r in results:
        for key, what in (
            ("peak_rss_alone_mib", "each side alone"),
            ("peak_rss_own_framework_mib", "each side alone, its own framework only"),
        ):
            if key in r:
                m = r[key]
                lines.append(
                    f"{r['part']}: peak RSS, {what}: leopard_jax {m['leopard_jax']:.0f} MiB,"
                    f" reference {m['reference']:.0f} MiB ({m['ratio']:.2f}x)"
                )
    for r in results:
        if "skipped" not in r and r.get("reference"):
            lines.append(f"{r['part']}: reference = {r['reference']['reference']}")
    return "\n".join(lines)


def gpu_peak_mib() -> dict[str, float]:
    """Peak device memory so far (process-wide, cumulative over parts) of each framework."""
    import jax
    import torch

    stats = jax.devices()[0].memory_stats() or {}
    return {
        "leopard_jax": round(stats.get("peak_bytes_in_use", 0) / 2**20, 1),
        "reference": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }


def run(
    parts: list[str], cfg: Config, on_part: Callable[[dict], None] = lambda report: None
) -> dict:
    env = setup_devices(cfg)
    results = []
    models = None
    report = {
        "config": dataclasses.asdict(cfg),
        "environment": env,
        "results": results,
    }
    for part in parts:
        start = time.perf_counter()
        if part in ("train", "embed"):
            models = models or build_models(cfg)
            found = train_part(cfg, models) if part == "train" else embed_part(cfg, models)
        elif part == "embed_onnx":
            found = embed_onnx_part(cfg)
        elif part == "local":
            found = local_part(cfg)
        elif part == "input":
            found = input_part(cfg)
        elif part == "layers":
            found = layers_part(cfg)
        else:
            try:
                found = data_part(cfg) if part == "data" else preprocess_part(cfg)
            except ModuleNotFoundError as e:  # e.g. a GPU image without grain or rembg
                found = {"part": part, "skipped": f"{e}; pip install the project to bench it"}
        if part in ("train", "embed") and cfg.device == "cpu":
            found["peak_rss_alone_mib"] = peaks_alone(part, cfg)  # the memory figures
            found["peak_rss_own_framework_mib"] = peaks_own_framework(part, cfg, models)
        found = found if isinstance(found, list) else [found]  # preprocess: one per stage
        wall_s = round(time.perf_counter() - start, 1)
        for result in found:
            result["wall_s"] = wall_s
            if cfg.device == "gpu" and part in ("train", "embed"):
                result["gpu_peak_mib"] = gpu_peak_mib()
        results.extend(found)
        print(f"[bench] {part} done in {wall_s} s", file=sys.stderr, flush=True)
        report["process_peak_rss_mib"] = round(process_peak_rss_mib(), 1)
        on_part(report)  # written as it goes: a later part that fails loses nothing
    return report


def settings(rest: list[str]) -> tuple[list[str], Config, str | None]:
    """(parts, Config, JSON path) from the parsed FLAGS and the positional part name."""
    if len(rest) > 1 or (rest and rest[0] not in (*PARTS, "all")):
        raise BenchError(
            f"unexpected arguments {rest}; the one positional is a part: {', '.join(PARTS)} or all"
        )
    try:
        height, width = (int(v) for v in _SIZE.value)
    except ValueError:
        height = width = 0
    if min(height, width) < 32:
        raise BenchError(
            f"--size {','.join(_SIZE.value)}: give H,W, each >= 32 (e.g. --size 256,512)"
        )
    if not _PEAK_OWN.value:  # (a --peak-own child's parent checked; it must not import JAX)
        from leopard_jax import models  # imports jax: after `command` has chosen the platform

        if _BACKBONE.value not in models.BACKBONES:
            raise BenchError(
                f"--backbone {_BACKBONE.value}: not one of {', '.join(models.BACKBONES)}"
            )
    for flag in (_U2NETP, _YOLOX):
        if flag.value and not pathlib.Path(flag.value).is_file():
            raise BenchError(
                f"--{flag.name} {flag.value}: not a file; pass the .onnx or leave the flag out"
            )
    cfg = Config(
        batch=_BATCH.value,
        height=height,
        width=width,
        device=_DEVICE.value,
        dtype=_DTYPE.value,
        steps=_STEPS.value,
        rounds=_ROUNDS.value,
        backbone=_BACKBONE.value,
        num_classes=_CLASSES.value,
        dims=_DIMS.value,
        threads=_THREADS.value,
        u2netp=_U2NETP.value,
        yolox=_YOLOX.value,
    )
    part = rest[0] if rest else "all"
    return (list(PARTS) if part == "all" else [part]), cfg, _JSON.value


def parse_args(argv: list[str]) -> tuple[list[str], Config, str | None]:
    """`settings` of a command line (library and test use); BenchError on bad input."""
    FLAGS.unparse_flags()
    try:
        rest = FLAGS(["bench.py", *argv])
    except flags.Error as e:
        raise BenchError(str(e)) from e
    return settings(rest[1:])


def command(rest: list[str]) -> None:
    if _DEVICE.value == "cpu":  # before anything imports jax
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:  # JAX preallocates 75 % of the GPU by default; leave torch its share
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    parts, cfg, json_out = settings(rest)
    if _PEAK_OF.value:
        if parts not in (["train"], ["embed"]):
            raise BenchError("--peak-of needs one part: train or embed")
        print(json.dumps(run_side_alone(parts[0], _PEAK_OF.value, cfg, own=_PEAK_OWN.value)))
        return

    def write(report: dict) -> None:
        if json_out:
            pathlib.Path(json_out).write_text(json.dumps(report, indent=2, default=str))

    report = run(parts, cfg, on_part=write)
    print(table(report["results"]))
    if json_out:
        print(f"[bench] wrote {json_out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return cli.run(FLAGS, command, argv, errors=(BenchError,), prog="python scripts/bench.py")


if __name__ == "__main__":
    sys.exit(main())
