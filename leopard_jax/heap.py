"""Give the heap XLA's compiler freed back to the operating system after each large compile.

Why: compiling B2's training step takes ~1.6 GiB of host heap (HLO passes, LLVM), freed
when it ends; glibc keeps those pages resident, and the step's own buffers, allocated next,
do not reuse them (large blocks are mapped afresh). So the compiler's leftovers sat under
the whole run: 4.98 GiB peak for the training step in a process of its own, 4.01 GiB with
`malloc_trim` after the compile (~130 ms); embedding 1313 -> 1204 MiB (issue 20's notes).
Installed by `parallel.py`, which every step and embedding program goes through; the
package import itself stays free of JAX (preprocessing and review never load it).

A listener on JAX's backend-compile event trims once per compile that took at least
`MIN_COMPILE_S`, before the compiled program first runs; on a C library without
`malloc_trim` (macOS, musl) nothing happens. `LEOPARD_JAX_TRIM_HEAP=0` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch
MIN_COMPILE_S = 0.5  # smaller compiles leave little behind; a trim costs 5-130 ms
OPT_OUT = "LEOPARD_JAX_TRIM_HEAP"
_installed = False


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def release() -> bool:
    """Return the heap's free pages to the OS now; False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def after_compile(event: str, duration_s: float, **_: object) -> None:
    """JAX monitoring listener: trim after a backend compile of at least MIN_COMPILE_S."""
    if event == COMPILE_EVENT and duration_s >= MIN_COMPILE_S:
        release()


def install() -> bool:
    """Register `after_compile` with JAX once; False when opted out."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    global _installed
    if not _installed:
        from jax import monitoring

        monitoring.register_event_duration_secs_listener(after_compile)
        _installed = True
    return True
