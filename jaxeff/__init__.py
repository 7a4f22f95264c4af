"""jaxeff: a JAX training framework for efficient sequence-model architectures."""

__version__ = "0.1.0"
