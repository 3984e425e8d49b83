"""XLA flags the package sets before JAX starts, each one measured (issue 20's notes).

`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`: XLA CPU (jaxlib 0.10)
hands convolutions to YNNPACK, which computes the kernel gradient of a k x k convolution
as a convolution whose window is the whole feature map; for EfficientNetV2-B2's fused-MBConv
stages that ran at ~4 GFLOP/s, a quarter of the training step. Without it XLA's own
(Eigen) convolutions run those gradients 3x faster and the B2 training step at batch 8,
256x512, went from 4.3 s to 2.6-3.0 s on 2 cores. Dots stay on YNNPACK.

`--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA CPU's default scheduler
orders the step so that independent ops can run at once, keeping more activations alive;
the memory-minimising order it falls back to cut the B2 training step's temporary buffers
from 3.50 GB to 2.29 GB (peak RSS 6.2 -> 4.9 GiB in a process of its own) and, on 2 cores
where there is little to run concurrently anyway, made the step faster: 2.64/2.59 s ->
2.37/2.35 s (alternating runs of the step alone, same loss), 0.51-0.52x -> 0.53-0.61x the
PyTorch reference (`scripts/bench.py train --batch 8`).

Both flags only touch the CPU backend. Applied by `leopard_jax/__init__.py` on import,
appended to the user's `XLA_FLAGS` (which win: a flag the user set is kept as they set it),
only before JAX has started a backend and only for the jaxlib releases they were measured on
and known to have the flags (`JAXLIB_TESTED`): an unknown flag in XLA_FLAGS aborts XLA at
start-up, on every backend, so a newer jaxlib gets no flag until it is measured and added.
`LEOPARD_JAX_XLA_FLAGS=0` turns them off.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

FLAGS = {
    "xla_cpu_experimental_ynn_fusion_type": "-individual_convolution",
    "xla_cpu_enable_concurrency_optimized_scheduler": "false",
}
JAXLIB_TESTED = ((0, 10),)  # (major, minor) releases measured with FLAGS
OPT_OUT = "LEOPARD_JAX_XLA_FLAGS"


def _jaxlib_version() -> tuple[int, ...]:
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ()
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def _backend_started() -> bool:
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started())


def merged(current: str, flags: dict[str, str] = FLAGS) -> str:
    """`current` XLA_FLAGS with each of `flags` appended unless it is already set there."""
    parts = current.split()
    for name, value in flags.items():
        if not any(p.lstrip("-").split("=")[0] == name for p in parts):
            parts.append(f"--{name}={value}")
    return " ".join(parts)


def apply() -> bool:
    """Add FLAGS to os.environ["XLA_FLAGS"]; False when skipped (opted out, JAX already
    started, or a jaxlib outside JAXLIB_TESTED)."""
    if os.environ.get(OPT_OUT, "1") == "0" or _backend_started():
        return False
    if _jaxlib_version() not in JAXLIB_TESTED:
        return False
    os.environ["XLA_FLAGS"] = merged(os.environ.get("XLA_FLAGS", ""))
    return True
