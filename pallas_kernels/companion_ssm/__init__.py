"""Companion-matrix SSM (SpaceTime): its convolution kernel (sequential / krylov / fast), the SSM over a sequence
by FFT convolution, and the one-step recurrence for decoding. See ops.py and reference.py."""

from .ops import KERNEL_IMPLS, companion_kernel, companion_ssm, companion_step
from .reference import causal_conv

__all__ = ["KERNEL_IMPLS", "causal_conv", "companion_kernel", "companion_ssm", "companion_step"]
