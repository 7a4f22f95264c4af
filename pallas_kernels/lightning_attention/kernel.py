"""Pallas kernels for Lightning Attention-2 (forward and backward).

Kernel layout (prepared by ops.py): rows are flattened (batch, head) pairs, B*H of them:
    q, k: [B*H, Sp, Kp]   v, do: [B*H, Sp, Wp]   rate: [B*H, 1, 1] f32   states: [B*H, Kp, Wp] f32
with Sp (S padded) a multiple of the block and the true length `seq_len` <= Sp (zero padding). Block t has
m_t = min(blk, seq_len - t*blk) valid rows; the block decays below use m_t so padding never decays the state.

Two variants of every sequential kernel, picked by `platform`:

* "triton" (GPU, and the CPU interpreter): grid (B*H[, d_v tiles]); the block axis is a `fori_loop` inside the
  kernel. Triton runs all grid points concurrently, so a carried state cannot live on a grid axis.
  Every in-kernel array has power-of-two dims (ops.py pads d_k/d_v to a power of two >= 16 and uses a
  power-of-two block >= 16, also the minimum for tl.dot).
* "tpu" (Mosaic): grid (B*H[, d_v tiles], blocks) with the block axis "arbitrary" (sequential) and the d_k x d_v
  state in a float32 VMEM scratch; Mosaic pipelines the per-block HBM<->VMEM copies. Block shapes are
  (blk, full d) with blk a multiple of 8 (16 for bf16), and d_v tiles of 128 when d_v is a multiple of 128.

Kernels:
  forward:           o, final_state     (sequential over blocks)
  backward intra:    dq, dk, dv of the intra-block (left-product) part; grid (B*H, blocks), fully parallel
  backward dq sweep: dq += (Lambda dO_t) KV_{t-1}^T            forward over blocks, carries KV (prefix state)
  backward dkdv:     dk += (Gamma V_t) dKV^T, dv += (Gamma K_t) dKV; reverse over blocks, carries
                     dKV (suffix state); what is left of dKV at the end is d(initial_state).
All matmuls accumulate in float32 (preferred_element_type); float32 operands use HIGHEST precision (IEEE on
Triton instead of tf32, multi-pass on TPU instead of one bf16 pass).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..common import F32, PAR, PLATFORMS, SEQ, check_platform, compiler_params, dot as _dot



# --------------------------------------------------------------------------------------------------------------
# In-kernel math shared by all kernels and both variants
# --------------------------------------------------------------------------------------------------------------


def _block_consts(rate_11, blk: int):
    """Decays that are the same for every block. rate_11: (1, 1) f32.

    mask (Y, Y): lam^(i-j) for i >= j else 0;  q_dec (Y, 1): lam^(i+1) (row i reads the carried state).
    """
    i = lax.broadcasted_iota(jnp.int32, (blk, blk), 0)
    j = lax.broadcasted_iota(jnp.int32, (blk, blk), 1)
    diff = i - j
    # Clamp before exp so the masked-out triangle stays finite (no inf * 0).
    mask = jnp.where(diff >= 0, jnp.exp(-rate_11 * jnp.maximum(diff, 0).astype(F32)), 0.0)
    r = lax.broadcasted_iota(jnp.int32, (blk, 1), 0)
    q_dec = jnp.exp(-rate_11 * (r + 1).astype(F32))
    return mask, q_dec


def _tail_decays(rate_11, blk: int, m):
    """Decays that depend on the block's number of valid rows m (only the last block can have m < blk).

    k_dec (Y, 1): lam^(m-1-j) for j < m else 0 (row j's weight at the block's last valid row; padded rows get
    0, so padding never decays the state);  blk_dec (1, 1): lam^m (carried state across the block).
    """
    r = lax.broadcasted_iota(jnp.int32, (blk, 1), 0)
    kd = m - 1 - r
    k_dec = jnp.where(kd >= 0, jnp.exp(-rate_11 * jnp.maximum(kd, 0).astype(F32)), 0.0)
    blk_dec = jnp.exp(-rate_11 * jnp.asarray(m, jnp.int32).astype(F32))
    return k_dec, blk_dec


def _valid(seq_len: int, blk: int, t):
    return jnp.minimum(seq_len - t * blk, blk)


def _fwd_block(q, k, v, kv, consts, rate, blk, m):
    """One block of the forward: returns (o f32 [Y, tv], new kv f32 [Kp, tv]) (Y = blk rows of the block)."""
    mask, q_dec = consts
    k_dec, blk_dec = _tail_decays(rate, blk, m)
    s = _dot(q, k, 1, 1) * mask  # (Q K^T) * M
    o = _dot(s.astype(v.dtype), v, 1, 0)  # intra-block left product
    o = o + _dot(q, kv, 1, 0) * q_dec  # inter-block: (Lambda Q) KV
    kv = kv * blk_dec + _dot(k.astype(F32) * k_dec, v, 0, 0)  # (Gamma K)^T V
    return o, kv


def _dq_inter(do, k, v, kv, dq_intra, q_dec, rate, blk, m):
    k_dec, blk_dec = _tail_decays(rate, blk, m)
    dq = dq_intra + _dot(do.astype(F32) * q_dec, kv, 1, 1)  # (Lambda dO) KV^T
    kv = kv * blk_dec + _dot(k.astype(F32) * k_dec, v, 0, 0)
    return dq, kv


def _dkdv_inter(q, k, v, do, dkv, dk_intra, dv_intra, q_dec, rate, blk, m):
    k_dec, blk_dec = _tail_decays(rate, blk, m)
    dk = dk_intra + _dot(v.astype(F32) * k_dec, dkv, 1, 1)  # (Gamma V) dKV^T
    dv = dv_intra + _dot(k.astype(F32) * k_dec, dkv, 1, 0)  # (Gamma K) dKV
    dkv = dkv * blk_dec + _dot(q.astype(F32) * q_dec, do, 0, 0)  # (Lambda Q)^T dO
    return dk, dv, dkv


# --------------------------------------------------------------------------------------------------------------
# Kernel bodies
# --------------------------------------------------------------------------------------------------------------


def _fwd_kernel_loop(rate_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, st_ref, *, blk, seq_len, nblocks):
    rate = rate_ref[...]
    consts = _block_consts(rate, blk)  # hoisted out of the block loop

    def body(t, kv):
        rows = pl.ds(pl.multiple_of(t * blk, blk), blk)
        o, kv = _fwd_block(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], kv, consts, rate, blk,
                           _valid(seq_len, blk, t))
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return kv

    st_ref[...] = lax.fori_loop(0, nblocks, body, s0_ref[...].astype(F32))


def _fwd_kernel_grid(rate_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, st_ref, kv_scr, *, blk, seq_len):
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _init():
        kv_scr[...] = s0_ref[...].astype(F32)

    rate = rate_ref[...]
    o, kv = _fwd_block(q_ref[...], k_ref[...], v_ref[...], kv_scr[...], _block_consts(rate, blk), rate, blk,
                       _valid(seq_len, blk, t))
    o_ref[...] = o.astype(o_ref.dtype)
    kv_scr[...] = kv

    @pl.when(t == pl.num_programs(2) - 1)
    def _done():
        st_ref[...] = kv


def _bwd_intra_kernel(rate_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, *, blk):
    # Padded rows of q/k/v/do are zero, so they add nothing here: no valid-row logic needed.
    mask, _ = _block_consts(rate_ref[...], blk)
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    dp = _dot(do, v, 1, 1) * mask  # (dO V^T) * M
    s = _dot(q, k, 1, 1) * mask  # (Q K^T) * M
    dq_ref[...] = _dot(dp.astype(k.dtype), k, 1, 0)
    dk_ref[...] = _dot(dp.astype(q.dtype), q, 0, 0)
    dv_ref[...] = _dot(s.astype(do.dtype), do, 0, 0)


def _dq_kernel_loop(rate_ref, k_ref, v_ref, do_ref, s0_ref, dqi_ref, dq_ref, *, blk, seq_len, nblocks):
    rate = rate_ref[...]
    _, q_dec = _block_consts(rate, blk)

    def body(t, kv):
        rows = pl.ds(pl.multiple_of(t * blk, blk), blk)
        dq, kv = _dq_inter(do_ref[rows, :], k_ref[rows, :], v_ref[rows, :], kv, dqi_ref[rows, :], q_dec, rate, blk,
                           _valid(seq_len, blk, t))
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        return kv

    lax.fori_loop(0, nblocks, body, s0_ref[...].astype(F32))


def _dq_kernel_grid(rate_ref, k_ref, v_ref, do_ref, s0_ref, dqi_ref, dq_ref, kv_scr, *, blk, seq_len):
    t = pl.program_id(1)

    @pl.when(t == 0)
    def _init():
        kv_scr[...] = s0_ref[...].astype(F32)

    rate = rate_ref[...]
    _, q_dec = _block_consts(rate, blk)
    dq, kv = _dq_inter(do_ref[...], k_ref[...], v_ref[...], kv_scr[...], dqi_ref[...], q_dec, rate, blk,
                       _valid(seq_len, blk, t))
    dq_ref[...] = dq.astype(dq_ref.dtype)
    kv_scr[...] = kv


def _dkdv_kernel_loop(rate_ref, q_ref, k_ref, v_ref, do_ref, dst_ref, dki_ref, dvi_ref, dk_ref, dv_ref, ds0_ref,
                      *, blk, seq_len, nblocks):
    rate = rate_ref[...]
    _, q_dec = _block_consts(rate, blk)

    def body(i, dkv):
        t = nblocks - 1 - i  # reverse sweep
        rows = pl.ds(pl.multiple_of(t * blk, blk), blk)
        dk, dv, dkv = _dkdv_inter(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :], dkv,
                                  dki_ref[rows, :], dvi_ref[rows, :], q_dec, rate, blk, _valid(seq_len, blk, t))
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        return dkv

    ds0_ref[...] = lax.fori_loop(0, nblocks, body, dst_ref[...].astype(F32))


def _dkdv_kernel_grid(rate_ref, q_ref, k_ref, v_ref, do_ref, dst_ref, dki_ref, dvi_ref, dk_ref, dv_ref, ds0_ref,
                      dkv_scr, *, blk, seq_len):
    i = pl.program_id(1)
    t = pl.num_programs(1) - 1 - i  # the index maps walk the blocks backwards

    @pl.when(i == 0)
    def _init():
        dkv_scr[...] = dst_ref[...].astype(F32)

    rate = rate_ref[...]
    _, q_dec = _block_consts(rate, blk)
    dk, dv, dkv = _dkdv_inter(q_ref[...], k_ref[...], v_ref[...], do_ref[...], dkv_scr[...], dki_ref[...],
                              dvi_ref[...], q_dec, rate, blk, _valid(seq_len, blk, t))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dkv_scr[...] = dkv

    @pl.when(i == pl.num_programs(1) - 1)
    def _done():
        ds0_ref[...] = dkv


# --------------------------------------------------------------------------------------------------------------
# pallas_call wrappers
# --------------------------------------------------------------------------------------------------------------


def _v_tile(platform: str, vp: int) -> int:
    """d_v tile of the forward grid: more parallel programs and a smaller live state per program."""
    if platform == "tpu":
        return 128 if vp > 128 and vp % 128 == 0 else vp  # lane dim: multiple of 128 or the full dim
    return min(vp, 32)  # Triton: keeps the f32 (Kp, tv) state of one program small enough for registers


def lightning_fwd(q, k, v, rate, s0, *, seq_len: int, blk: int, platform: str, interpret: bool = False):
    """Forward kernel. q, k: [B*H, Sp, Kp]; v: [B*H, Sp, Wp]; rate: [B*H, 1, 1] f32; s0: [B*H, Kp, Wp] f32.

    Returns (o [B*H, Sp, Wp] in v's dtype, final_state [B*H, Kp, Wp] f32). Rows >= seq_len of o are zero (their q
    rows are zero padding); the caller slices them off.
    """
    check_platform(platform)
    n, sp, kp = q.shape
    vp = v.shape[-1]
    nblocks = sp // blk
    tv = _v_tile(platform, vp)
    nv = vp // tv
    out_shape = (jax.ShapeDtypeStruct((n, sp, vp), v.dtype), jax.ShapeDtypeStruct((n, kp, vp), F32))
    if platform == "triton":
        kernel = functools.partial(_fwd_kernel_loop, blk=blk, seq_len=seq_len, nblocks=nblocks)
        in_specs = [
            pl.BlockSpec((None, 1, 1), lambda b, j: (b, 0, 0)),
            pl.BlockSpec((None, sp, kp), lambda b, j: (b, 0, 0)),
            pl.BlockSpec((None, sp, kp), lambda b, j: (b, 0, 0)),
            pl.BlockSpec((None, sp, tv), lambda b, j: (b, 0, j)),
            pl.BlockSpec((None, kp, tv), lambda b, j: (b, 0, j)),
        ]
        out_specs = [
            pl.BlockSpec((None, sp, tv), lambda b, j: (b, 0, j)),
            pl.BlockSpec((None, kp, tv), lambda b, j: (b, 0, j)),
        ]
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid=(n, nv), in_specs=in_specs, out_specs=out_specs,
            compiler_params=compiler_params(platform, interpret, None, kp * tv), interpret=interpret,
            name="lightning_attn_fwd",
        )(rate, q, k, v, s0)
    kernel = functools.partial(_fwd_kernel_grid, blk=blk, seq_len=seq_len)
    in_specs = [
        pl.BlockSpec((None, 1, 1), lambda b, j, t: (b, 0, 0)),
        pl.BlockSpec((None, blk, kp), lambda b, j, t: (b, t, 0)),
        pl.BlockSpec((None, blk, kp), lambda b, j, t: (b, t, 0)),
        pl.BlockSpec((None, blk, tv), lambda b, j, t: (b, t, j)),
        pl.BlockSpec((None, kp, tv), lambda b, j, t: (b, 0, j)),
    ]
    out_specs = [
        pl.BlockSpec((None, blk, tv), lambda b, j, t: (b, t, j)),
        pl.BlockSpec((None, kp, tv), lambda b, j, t: (b, 0, j)),  # resident across t, written at the end
    ]
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(n, nv, nblocks), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((kp, tv), F32)],
        compiler_params=compiler_params(platform, interpret, (PAR, PAR, SEQ)),
        interpret=interpret, name="lightning_attn_fwd",
    )(rate, q, k, v, s0)


def lightning_bwd(q, k, v, rate, s0, do, dst, *, seq_len: int, blk: int, platform: str, interpret: bool = False):
    """Backward kernels. Shapes as lightning_fwd plus do: [B*H, Sp, Wp], dst (final-state cotangent): [B*H, Kp, Wp].

    Returns (dq, dk, dv in the input dtypes, d_initial_state [B*H, Kp, Wp] f32).
    """
    check_platform(platform)
    n, sp, kp = q.shape
    vp = v.shape[-1]
    nblocks = sp // blk

    # 1) intra-block part: independent per (row, block).
    blk_k = pl.BlockSpec((None, blk, kp), lambda b, t: (b, t, 0))
    blk_v = pl.BlockSpec((None, blk, vp), lambda b, t: (b, t, 0))
    rate_spec2 = pl.BlockSpec((None, 1, 1), lambda b, t: (b, 0, 0))
    dqi, dki, dvi = pl.pallas_call(
        functools.partial(_bwd_intra_kernel, blk=blk),
        out_shape=(jax.ShapeDtypeStruct((n, sp, kp), F32), jax.ShapeDtypeStruct((n, sp, kp), F32),
                   jax.ShapeDtypeStruct((n, sp, vp), F32)),
        grid=(n, nblocks), in_specs=[rate_spec2, blk_k, blk_k, blk_v, blk_v], out_specs=[blk_k, blk_k, blk_v],
        compiler_params=compiler_params(platform, interpret, (PAR, PAR)),
        interpret=interpret, name="lightning_attn_bwd_intra",
    )(rate, q, k, v, do)

    dq_shape = jax.ShapeDtypeStruct((n, sp, kp), q.dtype)
    dkdv_shape = (jax.ShapeDtypeStruct((n, sp, kp), k.dtype), jax.ShapeDtypeStruct((n, sp, vp), v.dtype),
                  jax.ShapeDtypeStruct((n, kp, vp), F32))
    if platform == "triton":
        full_k = pl.BlockSpec((None, sp, kp), lambda b: (b, 0, 0))
        full_v = pl.BlockSpec((None, sp, vp), lambda b: (b, 0, 0))
        state = pl.BlockSpec((None, kp, vp), lambda b: (b, 0, 0))
        rate_spec = pl.BlockSpec((None, 1, 1), lambda b: (b, 0, 0))
        dq = pl.pallas_call(
            functools.partial(_dq_kernel_loop, blk=blk, seq_len=seq_len, nblocks=nblocks),
            out_shape=dq_shape, grid=(n,), in_specs=[rate_spec, full_k, full_v, full_v, state, full_k],
            out_specs=full_k, compiler_params=compiler_params(platform, interpret, None, kp * vp),
            interpret=interpret, name="lightning_attn_bwd_dq",
        )(rate, k, v, do, s0, dqi)
        dk, dv, ds0 = pl.pallas_call(
            functools.partial(_dkdv_kernel_loop, blk=blk, seq_len=seq_len, nblocks=nblocks),
            out_shape=dkdv_shape, grid=(n,),
            in_specs=[rate_spec, full_k, full_k, full_v, full_v, state, full_k, full_v],
            out_specs=[full_k, full_v, state], compiler_params=compiler_params(platform, interpret, None, kp * vp),
            interpret=interpret, name="lightning_attn_bwd_dkdv",
        )(rate, q, k, v, do, dst, dki, dvi)
        return dq, dk, dv, ds0

    seq = (PAR, SEQ)
    fwd_k = pl.BlockSpec((None, blk, kp), lambda b, t: (b, t, 0))
    fwd_v = pl.BlockSpec((None, blk, vp), lambda b, t: (b, t, 0))
    state = pl.BlockSpec((None, kp, vp), lambda b, t: (b, 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel_grid, blk=blk, seq_len=seq_len),
        out_shape=dq_shape, grid=(n, nblocks), in_specs=[rate_spec2, fwd_k, fwd_v, fwd_v, state, fwd_k],
        out_specs=fwd_k, scratch_shapes=[pltpu.VMEM((kp, vp), F32)],
        compiler_params=compiler_params(platform, interpret, seq), interpret=interpret, name="lightning_attn_bwd_dq",
    )(rate, k, v, do, s0, dqi)
    last = nblocks - 1
    rev_k = pl.BlockSpec((None, blk, kp), lambda b, i: (b, last - i, 0))
    rev_v = pl.BlockSpec((None, blk, vp), lambda b, i: (b, last - i, 0))
    dk, dv, ds0 = pl.pallas_call(
        functools.partial(_dkdv_kernel_grid, blk=blk, seq_len=seq_len),
        out_shape=dkdv_shape, grid=(n, nblocks),
        in_specs=[rate_spec2, rev_k, rev_k, rev_v, rev_v, state, rev_k, rev_v],
        out_specs=[rev_k, rev_v, state], scratch_shapes=[pltpu.VMEM((kp, vp), F32)],
        compiler_params=compiler_params(platform, interpret, seq), interpret=interpret, name="lightning_attn_bwd_dkdv",
    )(rate, q, k, v, do, dst, dki, dvi)
    return dq, dk, dv, ds0
