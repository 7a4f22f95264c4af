"""Pallas kernels, one sub-package per kernel: `reference.py` (pure jnp), `kernel.py` (pallas_call
forward/backward), `ops.py` (the public op with a custom VJP and an `impl=` switch)."""
