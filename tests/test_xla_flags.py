"""xla_flags: the package's XLA flags join the user's XLA_FLAGS without overriding them, and
reach XLA in a fresh process that imports leopard_jax (a user's opt-out keeps them off)."""

from __future__ import annotations

import os
import subprocess
import sys

from leopard_jax import xla_flags

FLAG = "xla_cpu_experimental_ynn_fusion_type"
OURS = [f"--{name}={value}" for name, value in xla_flags.FLAGS.items()]


def test_merged_appends_and_keeps_the_users_own_setting():
    assert FLAG in xla_flags.FLAGS
    assert xla_flags.merged("").split() == OURS
    assert xla_flags.merged("--xla_force_host_platform_device_count=2").split() == [
        "--xla_force_host_platform_device_count=2",
        *OURS,
    ]
    # the user's own value of one of ours wins, in place; the others are still added
    mine = xla_flags.merged(f"--{FLAG}=individual_dot").split()
    others = [f for f in OURS if not f.startswith(f"--{FLAG}=")]
    assert others and mine == [f"--{FLAG}=individual_dot", *others]
    assert xla_flags.merged(xla_flags.merged("")).split() == OURS  # idempotent


def run_fresh(env_extra: dict[str, str]) -> str:
    """XLA_FLAGS as a fresh process sees it after `import leopard_jax` and a JAX computation
    (which aborts if XLA does not know a flag)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_flags.OPT_OUT)}
    code = (
        "import leopard_jax, os, jax.numpy as jnp; "
        "assert float(jnp.ones(3).sum()) == 3.0; print(os.environ.get('XLA_FLAGS', ''))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "JAX_PLATFORMS": "cpu", **env_extra},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_a_fresh_process_gets_the_flags_unless_opted_out():
    flags = run_fresh({})
    if xla_flags._jaxlib_version() in xla_flags.JAXLIB_TESTED:
        assert flags.split() == OURS
    else:
        assert flags == ""  # an untested jaxlib may lack the flag, which would abort XLA
    assert run_fresh({xla_flags.OPT_OUT: "0"}) == ""
