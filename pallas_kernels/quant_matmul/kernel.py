"""Pallas kernel of the quantized matmul: int8 codes of activations x int8 codes of weights, per group of G inputs,
accumulated in int32 and scaled by the two groups' scales into a float32 output.

Layouts (prepared by ops.py; padding is zero codes, so it adds nothing):
    x codes  int8 [nG, Np, G]       x scales float32 [nG, Np, 1]  (a column per group: the token's scale)
    W codes  int8 [nG, G, Op]       W scales float32 [nG, 1, Op]  (a row per group: each output's scale)
    out      float32 [Np, Op]
Grid (Np / bn, Op / bo, nG / kg): a program owns one output tile and walks kg groups with a fori_loop; each step
is one (bn, G) x (G, bo) integer dot and a rank-1 rescale, acc += dot * xs[g] * ws[g]. Group-major layouts put the
loop index on the leading axis, which both Mosaic and Triton index dynamically without lane slicing.
* GPU: kg = nG, one step along the last axis (Triton runs grid points concurrently, so no axis may carry a sum).
* TPU: kg groups per step (ops.py: at most 8) and the output tile accumulates over the last, sequential axis.
  Loading every group at once does not fit: a [nG, bn, 1] scale block is padded to 128 lanes in VMEM, and at
  xLSTM 7B's down projection (nG = 86) the blocks needed 16.3 MiB of the 16 MiB scoped VMEM.
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

from ..common import F32, PAR, SEQ, check_platform, compiler_params


def _body(xc_ref, xs_ref, wc_ref, ws_ref, o_ref, *, groups_per_step: int, steps: int):
    def step(g, acc):
        part = lax.dot_general(xc_ref[g], wc_ref[g], (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        return acc + part.astype(F32) * xs_ref[g] * ws_ref[g]

    acc = lax.fori_loop(0, groups_per_step, step, jnp.zeros(o_ref.shape, F32))
    if steps == 1:
        o_ref[...] = acc
        return

    @pl.when(pl.program_id(2) == 0)
    def _first():
        o_ref[...] = acc

    @pl.when(pl.program_id(2) > 0)
    def _rest():
        o_ref[...] += acc


def quant_matmul_kernel(xc_gNG, xs_gN1, wc_gGO, ws_g1O, *, block_n: int, block_o: int, platform: str,
                        groups_per_step: int | None = None, interpret: bool = False):
    """out [Np, Op] float32 (see the module docstring for the layouts); Np, Op multiples of the blocks, nG of
    `groups_per_step` (default: all groups in one step)."""
    check_platform(platform)
    n_groups, n, g = xc_gNG.shape
    o = wc_gGO.shape[-1]
    kg = groups_per_step or n_groups
    assert n % block_n == 0 and o % block_o == 0 and n_groups % kg == 0, (n, o, n_groups, block_n, block_o, kg)
    steps = n_groups // kg
    return pl.pallas_call(
        functools.partial(_body, groups_per_step=kg, steps=steps),
        out_shape=jax.ShapeDtypeStruct((n, o), F32),
        grid=(n // block_n, o // block_o, steps),
        in_specs=[pl.BlockSpec((kg, block_n, g), lambda i, j, k: (k, i, 0)),
                  pl.BlockSpec((kg, block_n, 1), lambda i, j, k: (k, i, 0)),
                  pl.BlockSpec((kg, g, block_o), lambda i, j, k: (k, 0, j)),
                  pl.BlockSpec((kg, 1, block_o), lambda i, j, k: (k, 0, j))],
        out_specs=pl.BlockSpec((block_n, block_o), lambda i, j, k: (i, j)),
        compiler_params=compiler_params(platform, interpret, (PAR, PAR, SEQ), block_n * block_o),
        interpret=interpret,
        name="quant_matmul",
    )(xc_gNG, xs_gN1, wc_gGO, ws_g1O)
