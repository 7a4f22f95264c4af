"""The quantizer and the jnp forms of the quantized matmul.

Symmetric, one scale per group of G consecutive elements along the last axis of each row (a token's features, or a
weight column's inputs once the weight is viewed as [O, I]); for b bits, qmax = 2^(b-1) - 1:

    s_g    = clip(max_{i in g} |v_i| / qmax, 1e-5, 1e4)        float32 (the floor keeps an all-zero group finite)
    code_i = clip(round_half_even(v_i / s_g), -2^(b-1), qmax)
    value  = code_i * s_g

A ragged last group holds the remaining I mod G elements (zero padding changes neither its max nor its codes).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
SCALE_MIN, SCALE_MAX = 1e-5, 1e4


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def pad_groups(v_NI, group_size: int):
    """[N, I] -> [N, nG, G], zero padded."""
    n, i = v_NI.shape
    pad = -i % group_size
    return jnp.pad(v_NI, ((0, 0), (0, pad))).reshape(n, (i + pad) // group_size, group_size)


def _divide(a, b):
    """a / b rounded as IEEE division, as FlexQ's torch code does. XLA rewrites a division by a broadcast value into
    a product with its reciprocal (up to 1 ulp off, enough to move a scale or flip a rounding); a divisor of the
    full shape behind an optimization barrier is not seen as a broadcast."""
    return a / lax.optimization_barrier(b)


def quantize_rows(v_NI, bits: int, group_size: int):
    """(codes int32 [N, I], scales float32 [N, nG]) of each row, grouped along I."""
    n, i = v_NI.shape
    v_NgG = pad_groups(v_NI.astype(F32), group_size)
    absmax_Ng = jnp.max(jnp.abs(v_NgG), axis=-1)
    s_Ng = jnp.clip(_divide(absmax_Ng, jnp.full(absmax_Ng.shape, qmax(bits), F32)), SCALE_MIN, SCALE_MAX)
    codes_NgG = jnp.clip(jnp.round(_divide(v_NgG, jnp.broadcast_to(s_Ng[..., None], v_NgG.shape))),
                         -qmax(bits) - 1, qmax(bits))
    return codes_NgG.reshape(n, -1)[:, :i].astype(jnp.int32), s_Ng


def dequantize_rows(codes_NI, s_Ng, group_size: int):
    """codes x their group's scale, float32 [N, I]."""
    n, i = codes_NI.shape
    return (pad_groups(codes_NI.astype(F32), group_size) * s_Ng[..., None]).reshape(n, -1)[:, :i]


def dequantized_matmul(x_NI, w_codes_IO, w_scales_gO, group_size: int, act_bits: int):
    """The definition: (x quantized per token and dequantized) @ (W dequantized), float32 at HIGHEST precision."""
    xq_NI = dequantize_rows(*quantize_rows(x_NI, act_bits, group_size), group_size)
    w_IO = dequantize_rows(w_codes_IO.T, w_scales_gO.T, group_size).T[:x_NI.shape[1]]  # zero rows of a serving layout
    return jnp.dot(xq_NI, w_IO, precision=lax.Precision.HIGHEST, preferred_element_type=F32)


def grouped_codes(x_NI, w_codes_IO, group_size: int, act_bits: int):
    """The integer operands per group: (x codes int8 [N, nG, G], x scales [N, nG], W codes int8 [nG, G, O]),
    ragged groups zero padded."""
    xc_NI, xs_Ng = quantize_rows(x_NI, act_bits, group_size)
    xc_NgG = pad_groups(xc_NI, group_size).astype(jnp.int8)
    i, o = w_codes_IO.shape
    pad = -i % group_size  # rows of zero codes, only for a ragged last group: otherwise a free reshape, no copy of W
    wc_IO = jnp.pad(w_codes_IO.astype(jnp.int8), ((0, pad), (0, 0))) if pad else w_codes_IO.astype(jnp.int8)
    return xc_NgG, xs_Ng, wc_IO.reshape((i + pad) // group_size, group_size, o)


def xla_matmul(x_NI, w_codes_IO, w_scales_gO, group_size: int, act_bits: int):
    """Integer codes multiplied per group with int32 accumulation, then the two scales; summed over groups."""
    xc_NgG, xs_Ng, wc_gGO = grouped_codes(x_NI, w_codes_IO, group_size, act_bits)
    acc_NgO = jnp.einsum("ngk,gko->ngo", xc_NgG, wc_gGO, preferred_element_type=jnp.int32)
    return jnp.einsum("ngo,ng,go->no", acc_NgO.astype(F32), xs_Ng, w_scales_gO.astype(F32),
                      precision=lax.Precision.HIGHEST)
