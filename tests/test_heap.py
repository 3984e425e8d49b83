"""heap: every large XLA compile is followed by a trim, through JAX's own compile event (so a
JAX that renamed the event fails here instead of silently keeping the compiler's heap)."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import pytest

from leopard_jax import heap, parallel  # noqa: F401  (parallel installs the listener)


@pytest.fixture
def trims(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(heap, "release", lambda: calls.append("trim") or True)
    return calls


def test_a_compile_as_long_as_the_threshold_is_followed_by_one_trim(trims, monkeypatch):
    x = jnp.arange(7.0).block_until_ready()
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
    monkeypatch.setattr(heap, "MIN_COMPILE_S", 0.0)
    f(x).block_until_ready()
    assert trims == ["trim"]
    f(x).block_until_ready()  # cached: no compile, no trim
    assert trims == ["trim"]


def test_short_compiles_and_other_events_are_left_alone(trims):
    heap.after_compile(heap.COMPILE_EVENT, heap.MIN_COMPILE_S / 2)
    heap.after_compile("/jax/core/compile/jaxpr_trace_duration", 60.0)
    assert trims == []
    heap.after_compile(heap.COMPILE_EVENT, heap.MIN_COMPILE_S)
    assert trims == ["trim"]


def test_install_is_idempotent_and_the_opt_out_keeps_it_off(monkeypatch):
    from jax._src import monitoring

    before = list(monitoring._event_duration_secs_listeners)
    assert heap.install()
    assert monitoring._event_duration_secs_listeners == before  # installed once, on import
    assert before.count(heap.after_compile) == 1
    monkeypatch.setenv(heap.OPT_OUT, "0")
    assert not heap.install()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_trims_on_glibc():
    assert heap.release()
