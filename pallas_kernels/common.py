"""Pieces the Pallas kernel files here share: the in-kernel matmul and head-width padding."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
MIN_DIM = 16  # tl.dot needs >= 16 per dim; also a multiple of the TPU sublane tile


def dot(a, b, contract_a: int, contract_b: int):
    """2-D matmul contracting a's dim `contract_a` with b's dim `contract_b`, accumulated in float32."""
    if a.dtype != b.dtype:  # Triton needs equal operand types: promote to float32
        a, b = a.astype(F32), b.astype(F32)
    prec = lax.Precision.HIGHEST if a.dtype == F32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=prec,
                           preferred_element_type=F32)


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def pad_dim(d: int, platform: str) -> int:
    """A head dim padded for the kernels: a power of two >= 16 (Triton), a multiple of 128 above 128 on TPU."""
    if platform == "tpu" and d > 128:
        return -(-d // 128) * 128  # lane tile
    return max(MIN_DIM, next_pow2(d))
