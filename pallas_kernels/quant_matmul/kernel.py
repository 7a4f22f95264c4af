"""Pallas kernel of the quantized matmul: int8 codes of activations x int8 codes of weights, per group of G inputs,
accumulated in int32 and scaled by the two groups' scales into a float32 output.

Layouts (prepared by ops.py; padding is zero codes, so it adds nothing):
    x codes  int8 [nG, Np, G]       x scales float32 [nG, Np, 1]  (a column per group: the token's scale)
    W codes  int8 [nG, G, Op]       W scales float32 [nG, 1, Op]  (a row per group: each output's scale)
    out      float32 [Np, Op]
Grid (Np / bn, Op / bo), both parallel: a program owns one output tile and walks the groups with a fori_loop
(no grid axis carries state, as Triton runs grid points concurrently); each step is one (bn, G) x (G, bo) integer
dot and a rank-1 rescale, acc += dot * xs[g] * ws[g]. Group-major layouts put the loop index on the leading axis,
which both Mosaic and Triton index dynamically without lane slicing.
* "triton" (GPU; also the CPU interpreter): int8 x int8 -> int32 dot (tensor cores on sm_80+).
* "tpu" (Mosaic): the same int32 dot (v5e's MXU takes int8).
Untuned: no GPU or TPU was lent; only the interpreter and AOT compiles for an H100 and a v5e were run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..common import F32, PAR, check_platform, compiler_params


def _body(xc_ref, xs_ref, wc_ref, ws_ref, o_ref, *, n_groups: int):
    def step(g, acc):
        part = lax.dot_general(xc_ref[g], wc_ref[g], (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        return acc + part.astype(F32) * xs_ref[g] * ws_ref[g]

    o_ref[...] = lax.fori_loop(0, n_groups, step, jnp.zeros(o_ref.shape, F32))


def quant_matmul_kernel(xc_gNG, xs_gN1, wc_gGO, ws_g1O, *, block_n: int, block_o: int, platform: str,
                        interpret: bool = False):
    """out [Np, Op] float32 (see the module docstring for the layouts); Np, Op multiples of the blocks."""
    check_platform(platform)
    n_groups, n, g = xc_gNG.shape
    o = wc_gGO.shape[-1]
    assert n % block_n == 0 and o % block_o == 0, (n, o, block_n, block_o)
    return pl.pallas_call(
        functools.partial(_body, n_groups=n_groups),
        out_shape=jax.ShapeDtypeStruct((n, o), F32),
        grid=(n // block_n, o // block_o),
        in_specs=[pl.BlockSpec((n_groups, block_n, g), lambda i, j: (0, i, 0)),
                  pl.BlockSpec((n_groups, block_n, 1), lambda i, j: (0, i, 0)),
                  pl.BlockSpec((n_groups, g, block_o), lambda i, j: (0, 0, j)),
                  pl.BlockSpec((n_groups, 1, block_o), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((block_n, block_o), lambda i, j: (i, j)),
        compiler_params=compiler_params(platform, interpret, (PAR, PAR), block_n * block_o),
        interpret=interpret,
        name="quant_matmul",
    )(xc_gNG, xs_gN1, wc_gGO, ws_g1O)
