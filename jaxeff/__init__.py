"""jaxeff: a JAX training framework for efficient sequence-model architectures."""

from jaxeff import xla_workarounds as _xla_workarounds

_xla_workarounds.apply()  # before any JAX backend starts

__version__ = "0.1.0"
