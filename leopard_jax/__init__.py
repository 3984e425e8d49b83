"""leopard_jax: re-identification of individual spotted animals in JAX/Flax."""

from leopard_jax import xla_flags as _xla_flags

_xla_flags.apply()  # before any JAX backend starts; see xla_flags.py
