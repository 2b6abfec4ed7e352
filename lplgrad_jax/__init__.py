"""LPLgrad active learning (loss prediction + entropy-gradient-norm query) in JAX/Flax NNX."""

from lplgrad_jax import xla_flags as _xla_flags

_xla_flags.apply()  # before JAX starts a backend: see xla_flags.py
