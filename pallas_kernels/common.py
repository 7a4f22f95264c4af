"""Pieces the Pallas kernel files here share: the kernel bodies' platforms and compiler params, the in-kernel
matmul, and head-width padding."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

F32 = jnp.float32
MIN_DIM = 16  # tl.dot needs >= 16 per dim; also a multiple of the TPU sublane tile (and bf16's)
PLATFORMS = ("triton", "tpu")  # the kernel bodies: Triton (GPU) and Mosaic (TPU)
PAR, SEQ = "parallel", "arbitrary"  # grid dimension semantics, as strings: accepted by every jax version we support


def check_platform(platform: str) -> None:
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")


def compiler_params(platform: str, interpret: bool, semantics, state_elems: int = 0):
    """Compiler params per backend (None in the interpreter). Mosaic: the grid's dimension semantics. Triton: 8
    warps when a program carries a large f32 tile (>= 128 x 64 elements), else 4. Untuned: no GPU was lent yet."""
    if interpret:
        return None
    if platform == "tpu":
        return pltpu.CompilerParams(dimension_semantics=semantics)
    return plt.CompilerParams(num_warps=8 if state_elems >= 128 * 64 else 4, num_stages=2)


def on_platform(args, *, kernel: Callable[[str], Callable], cpu: Callable, variant: str | None = None):
    """`kernel(body)(*args)` with the body of the platform being lowered for, `cpu(*args)` on CPU.

    `kernel(body)` returns the function for one kernel body, "triton" (CUDA, ROCm) or "tpu" (Mosaic); `variant`
    forces one body everywhere (tests run both in the interpreter). The choice is made when lowering
    (`lax.platform_dependent`), never from `jax.default_backend()` at trace time: a CPU host compiling ahead of
    time for a GPU or TPU must emit that platform's kernel, and the other branches are never lowered."""
    gpu, tpu = kernel(variant or "triton"), kernel(variant or "tpu")
    return lax.platform_dependent(*args, cpu=cpu, cuda=gpu, rocm=gpu, tpu=tpu)


def sds(shape, dtype=F32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def dot(a, b, contract_a: int, contract_b: int):
    """2-D matmul contracting a's dim `contract_a` with b's dim `contract_b`, accumulated in float32."""
    if a.dtype != b.dtype:  # Triton needs equal operand types: promote to float32
        a, b = a.astype(F32), b.astype(F32)
    prec = lax.Precision.HIGHEST if a.dtype == F32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=prec,
                           preferred_element_type=F32)


def bf16_parts(x, n: int):
    """x (float32) as n bfloat16 terms, largest first: x = sum(parts) exactly for n = 3 (3 x 8 significant bits;
    each remainder x - part is exact in float32), barring underflow below float32's normal range."""
    parts = []
    for _ in range(n):
        p = x.astype(jnp.bfloat16)
        parts.append(p)
        x = x - p.astype(F32)
    return parts


def split_dot(a, b, contract_a: int, contract_b: int):
    """Triton's matmul at float32 accuracy on bf16 tensor cores, accumulated in float32.

    A float32 operand is split into 3 bf16 terms (exact); products of bf16 terms are exact in float32, so a
    bf16 x f32 matmul is 3 bf16 matmuls with the result of the float32 one up to the order of the float32 sums.
    f32 x f32 keeps the 6 products hi.hi .. lo.hi whose scale is >= 2^-16 of the leading one (the 3 dropped ones
    are <= 2^-24 relative: float32 rounding). Why not `dot` (precision HIGHEST): Triton lowers a float32 dot
    as IEEE FMAs, not tensor-core instructions; at (64, 128) x (128, 128) that is thousands of unrolled FMAs
    per thread, which took ptxas minutes per kernel (and runs far slower)."""
    dims = (((contract_a,), (contract_b,)), ((), ()))
    if a.dtype == b.dtype and a.dtype in (jnp.bfloat16, jnp.float16):
        return lax.dot_general(a, b, dims, preferred_element_type=F32)
    if not all(x.dtype in (jnp.bfloat16, jnp.float16, F32) for x in (a, b)):  # float64: the plain dot
        return dot(a, b, contract_a, contract_b)
    pa, pb = ([x] if x.dtype == jnp.bfloat16 else bf16_parts(x.astype(F32), 3) for x in (a, b))
    terms = [(x, y) for ia, x in enumerate(pa) for ib, y in enumerate(pb) if ia + ib <= 2]
    out = None
    for x, y in reversed(terms):  # smallest terms first
        t = lax.dot_general(x, y, dims, preferred_element_type=F32)
        out = t if out is None else out + t
    return out


def matmul(platform: str):
    """The in-kernel matmul of a body: bf16 tensor-core splits for Triton; Mosaic's float32 matmul (HIGHEST) on
    TPU, which compiles in seconds."""
    return split_dot if platform == "triton" else dot


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def pad_dim(d: int, platform: str) -> int:
    """A head dim padded for the kernels: a power of two >= 16 (Triton), a multiple of 128 above 128 on TPU."""
    if platform == "tpu" and d > 128:
        return -(-d // 128) * 128  # lane tile
    return max(MIN_DIM, next_pow2(d))
