"""Pallas kernels for the mLSTM cell (xLSTM): chunkwise forward and backward, TFLA-style, head dims tiled.

Public functions take the layout of reference.py (q_BHSK, k_BHSK, v_BHSW, gate pre-activations i_BHS, f_BHS,
state (C_BHKW, n_BHK, m_BH)) and pad inside; the kernels see B*H rows (flattened (batch, head) pairs):
    q, k: [B*H, Sp, Kp]   v, dnum: [B*H, Sp, Wp]   per-step scalars (i, log f, ...): [B*H, Sp, 1] f32
    chunk-start states: C [B*H, Z, Kp, Wp], n [B*H, Z, 1, Kp], m [B*H, Z, 1, 1] (all f32; Z chunks)
Sp is S padded to a multiple of the chunk length Y (padded steps: input gate -1e30, log f = 0, so they change
nothing); Kp/Wp are the head widths K/W padded with zeros (power of two >= 16: Triton arrays and tl.dot;
multiples of 128 above 128 on TPU). The q scale is always the true d_qk**-0.5. Per-step scalars are columns
(Y, 1); where a row (1, Y) is needed it is made in-kernel with a masked diagonal sum (no transposes, so the same
code lowers for both backends).

Head-dim tiling (TFLA-style; `_tiles` picks the sizes per platform). C, dC, h, dnum and dv split cleanly over
d_v, while n, m, the normaliser and the (Y, Y) score matrices depend on d_qk only, so every d_v tile recomputes
them (O(Y Kp) and O(Y^2 Kp) per chunk). The sequential kernels (a), (1) carry a (Ks, Ws) tile of C or dC: their
updates are outer products, so they split over d_qk as well (n, dn by d_qk tile; m, d(m) need neither). Results
that do not depend on a tile (n, dn per d_v tile; m, the routed stabiliser gradients per tile pair) come out once
per tile ([B*H, copies, ...]) and glue keeps the first. The parallel kernels (b), (0), (2v) hold all of d_qk and a
d_v tile Wt. Sums over d_v are needed only in the backward: the row sum sum(dh * num) (per-tile partials summed in
glue) and, in kernel (2qk), the score gradient dnum v^T, dnum C^T and v dC^T, accumulated over d_v tiles inside
the program (Triton: a loop; TPU: an "arbitrary" grid axis with VMEM accumulators). Kernel (2qk) also tiles d_qk
(Kt): its outputs dq, dk split over d_qk, and its gate-gradient partials, linear in the per-tile sums, are summed
over d_qk tiles in glue.

Kernels (the sequential ones have a "triton" body: grid (rows, d_qk tiles, d_v tiles), chunk loop in-kernel; and a
"tpu" body: grid (rows, d_qk tiles, d_v tiles, chunks) with the chunk axis "arbitrary" and the carried state in
VMEM scratch):
  forward  (a) states:      sequential over chunks -> chunk-start states (C_k, n_k, m_k) and the final state
           (b) outputs:     parallel over (row, chunk, d_v tile) -> h from the chunk-start state and the chunk's rows
  backward (0) prep:        kernel (b) again with dh: dnum = dh / denom, the tile's part of sum(dh * num), and the
                            per-row den and m_row; glue turns them into d(den) and the stabiliser terms
           (1) state grads: reverse sequential over chunks, carrying (dC, dn) and the routed d(m) (see below);
                            what is left at the start is (dc0, dn0)
           (2v) dv:         parallel over (row, chunk, d_v tile)
           (2qk) dq, dk:    parallel over (row, chunk, d_qk tile), summing over d_v tiles -> dq, dk and the tile's
                            part of d(i), d(log f)
  mlstm_bwd first reruns forward kernel (a): the op saves only the inputs. Glue in jnp (O(S) or O(K W) per row):
  padding, log f, sums of per-tile partials, the final state's d(m) weight, and d f = d(log f) * sigmoid(-f).
  The gate gradients are column/row sums of the (Y, Y) log-weight gradient matrix (not the q.dq - k.dk identity),
  so d(log f) has no cancellation between long sums.

Gradients of the max stabiliser. Autodiff of reference.chunked is the ground truth here. Treating every m as a
constant (the usual shortcut) is not enough: the returned final state is the true state times exp(-m_final), so
a loss on C or n sees m_final with weight -(sum C*dC + n.dn), an O(1) term; the output normaliser
max(|den|, exp(-m)) + eps also depends on the row's m, with weight -eps * sum(dh*h) / denom. With the states
written as true state * exp(-m), nothing else depends on any m, so the exact gradient is the m-held-fixed gradient
plus these two terms, each routed (as jnp.max's gradient does) to the log weight that attains the max:
  row t's m = max(b_t + m_k, max_s logD_ts): to the winning logD_ts, or to b_t and then on to m_k;
  m_{k+1} = max(g_k + m_k, max_tau a_tau): to the winning a_tau, or to g_k and then on to m_k.
The reverse kernel carries this routed d(m) across chunks (dropped at m0, which is not differentiated) and tells
the chunk kernel where it went, so both kernels agree on each max's winner. Exact ties (measure zero) go wholly
to one side here where jnp splits them.

All matmuls accumulate in float32 at float32 accuracy: Mosaic's float32 matmul (HIGHEST) on TPU; on GPU bf16
tensor-core matmuls with each float32 operand split into 3 bf16 terms (_split_dot: Triton lowers a float32 dot as
unrolled FMAs, which made ptxas take minutes on the backward kernel). Where a per-row weight multiplies a
contraction over the chunk's rows it goes on the narrower operand (the d_v tile), so the other stays bf16.
Limit: the parallel kernels hold whole (Y, Kp) blocks of q and k (not tiled over d_qk): with Y = 64 that caps Kp at
512 on an H100 (1024 asks for 259 KB of shared memory; ops.py's "auto" then takes the chunked jnp form). TPU
programs fit in VMEM well beyond that. Untuned: no GPU or TPU was available; only interpret-mode runs and compiles
for an H100 / a v5e chip (with ptxas register and spill counts) were checked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..common import (F32, MIN_DIM, PAR, PLATFORMS, SEQ, check_platform, compiler_params, matmul as _matmul,
                      next_pow2 as _next_pow2, pad_dim as _pad_dim, sds)

_PAD_INPUT_GATE = -1e30  # as reference.pad_to_chunks: exp(-1e30 - m) == 0

# Per-program budgets (see _tiles). Triton: a (Kp, wt) f32 state tile of the parallel kernels of at most 128 x 128
# (64 KB: 64 registers per thread at 8 warps; an H100 SM has 256 KB of registers), other tiles 64 wide. TPU: state
# tiles of at most 256 x 512 f32 (512 KB of VMEM; v5e's default scoped VMEM is 16 MiB), lane tiles of 128.
_TRITON_TILE_ELEMS, _TRITON_BLOCK = 128 * 128, 64
_TPU_TILE_ELEMS, _TPU_MAX_BLOCK_K, _LANES = 256 * 512, 512, 128


# --------------------------------------------------------------------------------------------------------------
# In-kernel math (arrays in, arrays out; shared by both bodies)
# --------------------------------------------------------------------------------------------------------------


def _iotas(n: int):
    return lax.broadcasted_iota(jnp.int32, (n, n), 0), lax.broadcasted_iota(jnp.int32, (n, n), 1)


def _col_to_row(x_Y1):
    r, c = _iotas(x_Y1.shape[0])
    return jnp.sum(jnp.where(r == c, x_Y1, 0.0), axis=0, keepdims=True)


def _row_to_col(x_1Y):
    r, c = _iotas(x_1Y.shape[1])
    return jnp.sum(jnp.where(r == c, x_1Y, 0.0), axis=1, keepdims=True)


def _sum_all(x):
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)  # (1, 1); one axis at a time


def _gates(i_Y1, logf_Y1, m_11):
    """Within-chunk log weights. b: inclusive cumsum of log f (column and row), g = b at the last row (1, 1),
    a_tau = g - b_tau + i_tau (row tau's log weight at the chunk end), l = g + m (the start state's), and the
    chunk-end stabiliser m_next = max(l, max a)."""
    Y = i_Y1.shape[0]
    r, c = _iotas(Y)
    b_1Y = jnp.sum(jnp.where(r <= c, logf_Y1, 0.0), axis=0, keepdims=True)
    b_Y1 = _row_to_col(b_1Y)
    last_1Y = lax.broadcasted_iota(jnp.int32, (1, Y), 1) == Y - 1
    g_11 = jnp.sum(jnp.where(last_1Y, b_1Y, 0.0), axis=1, keepdims=True)
    a_Y1 = g_11 - b_Y1 + i_Y1
    l_11 = g_11 + m_11
    amax_11 = jnp.max(a_Y1, axis=0, keepdims=True)
    return dict(b_Y1=b_Y1, b_1Y=b_1Y, g_11=g_11, a_Y1=a_Y1, l_11=l_11, amax_11=amax_11,
                m_next_11=jnp.maximum(l_11, amax_11))


def _row_logw(i_Y1, gt, m_11):
    """Log weights of the chunk outputs: logD (Y, Y) (-inf above the diagonal), the start state's column
    m_inter = b_t + m_k, their row maxima and the row stabiliser m_row = max(m_inter, m_intra)."""
    r, c = _iotas(i_Y1.shape[0])
    logD = jnp.where(r >= c, gt["b_Y1"] - gt["b_1Y"] + _col_to_row(i_Y1), -jnp.inf)
    m_inter = gt["b_Y1"] + m_11
    m_intra = jnp.max(logD, axis=1, keepdims=True)
    return logD, m_inter, m_intra, jnp.maximum(m_inter, m_intra)


def _state_step(k, v, i_Y1, logf_Y1, c_KW, n_1K, m_11, mm):
    """State after one chunk from the state before it (the same maths as reference.chunk_states); v and C may be
    a d_v tile."""
    gt = _gates(i_Y1, logf_Y1, m_11)
    m_next = gt["m_next_11"]
    decay = jnp.exp(gt["l_11"] - m_next)
    w = jnp.exp(gt["a_Y1"] - m_next)  # row tau's weight in the chunk-end state
    c_KW = decay * c_KW + mm(k, v.astype(F32) * w, 0, 0)
    n_1K = decay * n_1K + jnp.sum(k.astype(F32) * w, axis=0, keepdims=True)
    return c_KW, n_1K, m_next


def _chunk_num_den(q, k, v, i_Y1, logf_Y1, c_KW, n_1K, m_11, scale, mm):
    """Unnormalised chunk outputs (num (Y, Wt) of v's tile, den (Y, 1)) and the row stabiliser terms."""
    gt = _gates(i_Y1, logf_Y1, m_11)
    logD, m_inter, m_intra, m_row = _row_logw(i_Y1, gt, m_11)
    s = mm(q, k, 1, 1) * scale * jnp.exp(logD - m_row)
    wq = jnp.exp(m_inter - m_row) * scale  # the start state's weight per row, with the q scale
    num = mm(s, v, 1, 0) + mm(q, c_KW, 1, 0) * wq
    den = jnp.sum(s, axis=1, keepdims=True) + jnp.sum(q.astype(F32) * n_1K, axis=1, keepdims=True) * wq
    return num, den, m_row, m_inter >= m_intra


def _denom(den, m_row, eps: float):
    floor = jnp.exp(-m_row)
    return jnp.maximum(jnp.abs(den), floor) + eps, jnp.abs(den) >= floor


def _prep_terms(dsum, den, m_row, inter_wins, eps: float):
    """Per-row backward terms from dsum = sum(dh * num) / denom = sum(dh * h) over all of d_v: d(den) (only where
    |den| beats the floor) and the row stabiliser's gradient -eps*sum(dh*h)/denom (same in both branches of the
    max), split by which log weight attains m_row: the start-state column (r_inter) or the chunk's rows (r_intra).
    Elementwise: used in glue on [B*H, Sp, 1] columns."""
    denom, den_wins = _denom(den, m_row, eps)
    inv = 1.0 / denom
    sign = jnp.where(den >= 0, 1.0, -1.0)
    dden = jnp.where(den_wins, -dsum * inv * sign, 0.0)
    dm_row = -eps * dsum * inv
    r_inter = jnp.where(inter_wins, dm_row, 0.0)
    return dden, r_inter, dm_row - r_inter


def _state_step_bwd(q, dnum, dden_Y1, m_row_Y1, r_inter_Y1, i_Y1, logf_Y1, m_11, dc_KW, dn_1K, dm_11, scale, mm):
    """Cotangents of the chunk-start state from those of the chunk-end state (dnum, dC: a d_v tile). dm is the
    routed gradient of the chunk-end stabiliser m_{k+1}; it goes to the start state's weight l = g + m_k (rl,
    passed on to m_k) or to the winning row a_tau (ra)."""
    gt = _gates(i_Y1, logf_Y1, m_11)
    l_wins = gt["l_11"] >= gt["amax_11"]
    rl = jnp.where(l_wins, dm_11, 0.0)
    decay = jnp.exp(gt["l_11"] - gt["m_next_11"])
    w = jnp.exp(gt["b_Y1"] + m_11 - m_row_Y1) * scale  # row t's weight on the start state, with the q scale
    dc_KW = decay * dc_KW + mm(q, dnum * w, 0, 0)
    dn_1K = decay * dn_1K + jnp.sum(q.astype(F32) * (w * dden_Y1), axis=0, keepdims=True)
    dm_prev = rl + jnp.sum(r_inter_Y1, axis=0, keepdims=True)
    return dc_KW, dn_1K, dm_prev, rl, dm_11 - rl


def _suffix_sum(x_Y1):
    """y_r = sum_{t >= r} x_t, as a column."""
    r, c = _iotas(x_Y1.shape[0])
    return jnp.sum(jnp.where(c >= r, _col_to_row(x_Y1), 0.0), axis=1, keepdims=True)


def _scores(q, k, i_Y1, logf_Y1, m_11, m_row, scale, mm):
    """The chunk's gates, log weights, decay matrix exp(logD - m_row) and scores s = q k^T * scale * decay."""
    gt = _gates(i_Y1, logf_Y1, m_11)
    logD, m_inter, m_intra, _ = _row_logw(i_Y1, gt, m_11)
    dmat = jnp.exp(logD - m_row)
    return gt, logD, m_inter, m_intra, dmat, mm(q, k, 1, 1) * scale * dmat


def _chunk_dv(q, k, dnum, m_row, i_Y1, logf_Y1, m_11, dc_KW, scale, mm):
    """dv of one chunk for one d_v tile: through the scores (s^T dnum) and the chunk-end state (k dC)."""
    gt, _, _, _, _, s = _scores(q, k, i_Y1, logf_Y1, m_11, m_row, scale, mm)
    wk = jnp.exp(gt["a_Y1"] - gt["m_next_11"])
    return mm(s, dnum, 0, 0) + mm(k, dc_KW, 1, 0) * wk


def _dqk_zero(Y: int, kt: int):
    """Accumulators of kernel (2qk) over d_v tiles: d(score) (Y, Y), dnum C^T and v dC^T (Y, Kt), sum(C * dC)."""
    return (jnp.zeros((Y, Y), F32), jnp.zeros((Y, kt), F32), jnp.zeros((Y, kt), F32), jnp.zeros((1, 1), F32))


def _dqk_accumulate(acc, v, dnum, c_KW, dc_KW, mm):
    """Add one d_v tile (v, dnum: (Y, Wt); C, dC: (Kt, Wt)) to the accumulators."""
    ds, dqs, dkv, cdc = acc
    return (ds + mm(dnum, v, 1, 1), dqs + mm(dnum, c_KW, 1, 1), dkv + mm(v, dc_KW, 1, 1),
            cdc + _sum_all(c_KW * dc_KW))


def _chunk_dqk(q, k, q_t, k_t, acc, dden, m_row, r_inter, r_intra, i_Y1, logf_Y1, m_11, n_1K, dn_1K, rl_11, ra_11,
               first, scale, mm):
    """dq, dk of one chunk for one d_qk tile (q_t, k_t, n, dn: the tile; q, k: all of d_qk, for the scores), and
    this tile's part of d(i), d(log f).

    G (Y, Y) and G0 (Y, 1) are the gradients w.r.t. the log weights logD_ts and b_t + m_k of the outputs, Ga and
    Gl those of the chunk-end state's log weights a_tau and g + m_k; the gate gradients follow from
    logD_ts = b_t - b_s + i_s, a_tau = g - b_tau + i_tau and b, g being sums of log f. They are linear in
    (G, G0, Ga, Gl): G0, Ga and Gl's state term are sums over d_qk, so each tile adds its part; G and the routed
    stabiliser terms are whole-row quantities and come with the first tile only (`first`: 1.0 or 0.0).
    """
    ds_acc, dqs, dkv, cdc = acc
    gt, logD, m_inter, m_intra, dmat, s = _scores(q, k, i_Y1, logf_Y1, m_11, m_row, scale, mm)
    ds = ds_acc + dden  # d(score_ts)
    dp = ds * dmat * scale  # d(q_t . k_s)
    wq = jnp.exp(m_inter - m_row) * scale
    dq_state = dqs + dden * n_1K  # (Y, Kt), before the row weight wq
    dq = mm(dp, k_t, 1, 0) + dq_state * wq
    # Chunk-end state: C_{k+1} gets exp(a_tau - m_{k+1}) k_tau v_tau^T.
    dk_state = (dkv + dn_1K) * jnp.exp(gt["a_Y1"] - gt["m_next_11"])
    dk = mm(dp, q_t, 0, 0) + dk_state
    # Log-weight gradients, plus the routed stabiliser gradients (see the module docstring).
    g_mat = (ds * s + jnp.where(logD == m_intra, r_intra, 0.0)) * first
    g0 = jnp.sum(q_t.astype(F32) * dq_state, axis=1, keepdims=True) * wq + r_inter * first
    ga = (jnp.sum(k_t.astype(F32) * dk_state, axis=1, keepdims=True)
          + jnp.where(gt["a_Y1"] == gt["amax_11"], ra_11, 0.0) * first)
    gl = jnp.exp(gt["l_11"] - gt["m_next_11"]) * (cdc + _sum_all(n_1K * dn_1K)) + rl_11 * first
    col_g = _row_to_col(jnp.sum(g_mat, axis=0, keepdims=True))  # sum over t of G_ts, as a column over s
    di = col_g + ga
    db = jnp.sum(g_mat, axis=1, keepdims=True) - col_g + g0 - ga  # d(b_t)
    dlogf = _suffix_sum(db) + (jnp.sum(ga, axis=0, keepdims=True) + gl)  # b_t sums log f up to t; g sums all
    return dq, dk, di, dlogf


# --------------------------------------------------------------------------------------------------------------
# Kernel bodies
# --------------------------------------------------------------------------------------------------------------


def _rows(t, Y):
    return pl.ds(pl.multiple_of(t * Y, Y), Y)


def _states_kernel_loop(k_ref, v_ref, i_ref, lf_ref, c0_ref, n0_ref, m0_ref, cs_ref, ns_ref, ms_ref, c_ref, n_ref,
                        m_ref, *, Y, nc, mm):
    def body(t, carry):
        c, n, m = carry
        cs_ref[t] = c
        ns_ref[t] = n
        ms_ref[t] = m
        rows = _rows(t, Y)
        return _state_step(k_ref[rows, :], v_ref[rows, :], i_ref[rows, :], lf_ref[rows, :], c, n, m, mm)

    c, n, m = lax.fori_loop(0, nc, body, (c0_ref[...], n0_ref[...], m0_ref[...]))
    c_ref[...], n_ref[...], m_ref[...] = c, n, m


def _states_kernel_grid(k_ref, v_ref, i_ref, lf_ref, c0_ref, n0_ref, m0_ref, cs_ref, ns_ref, ms_ref, c_ref, n_ref,
                        m_ref, c_scr, n_scr, m_scr, *, mm):
    t = pl.program_id(3)  # grid (rows, d_qk tiles, d_v tiles, chunks)

    @pl.when(t == 0)
    def _init():
        c_scr[...], n_scr[...], m_scr[...] = c0_ref[...], n0_ref[...], m0_ref[...]

    c, n, m = c_scr[...], n_scr[...], m_scr[...]
    cs_ref[...], ns_ref[...], ms_ref[...] = c, n, m
    c, n, m = _state_step(k_ref[...], v_ref[...], i_ref[...], lf_ref[...], c, n, m, mm)
    c_scr[...], n_scr[...], m_scr[...] = c, n, m

    @pl.when(t == pl.num_programs(3) - 1)
    def _done():
        c_ref[...], n_ref[...], m_ref[...] = c, n, m


def _out_kernel(q_ref, k_ref, v_ref, i_ref, lf_ref, c_ref, n_ref, m_ref, h_ref, *, scale, eps, mm):
    num, den, m_row, _ = _chunk_num_den(q_ref[...], k_ref[...], v_ref[...], i_ref[...], lf_ref[...], c_ref[...],
                                        n_ref[...], m_ref[...], scale, mm)
    h_ref[...] = (num / _denom(den, m_row, eps)[0]).astype(h_ref.dtype)


def _prep_kernel(q_ref, k_ref, v_ref, i_ref, lf_ref, c_ref, n_ref, m_ref, dh_ref, dnum_ref, dsum_ref, den_ref,
                 mrow_ref, inter_ref, *, scale, eps, mm):
    num, den, m_row, inter_wins = _chunk_num_den(q_ref[...], k_ref[...], v_ref[...], i_ref[...], lf_ref[...],
                                                 c_ref[...], n_ref[...], m_ref[...], scale, mm)
    dnum = dh_ref[...].astype(F32) / _denom(den, m_row, eps)[0]
    dnum_ref[...] = dnum
    dsum_ref[...] = jnp.sum(dnum * num, axis=1, keepdims=True)  # this d_v tile's part of sum(dh * h)
    den_ref[...], mrow_ref[...] = den, m_row
    inter_ref[...] = jnp.where(inter_wins, 1.0, 0.0)


def _dstates_kernel_loop(q_ref, dnum_ref, dden_ref, mrow_ref, rint_ref, i_ref, lf_ref, ms_ref, dc_ref, dn_ref,
                         dm_ref, dcs_ref, dns_ref, rl_ref, ra_ref, dc0_ref, dn0_ref, *, Y, nc, scale, mm):
    def body(j, carry):
        t = nc - 1 - j  # reverse sweep
        dc, dn, dm = carry
        dcs_ref[t] = dc
        dns_ref[t] = dn
        rows = _rows(t, Y)
        dc, dn, dm, rl, ra = _state_step_bwd(q_ref[rows, :], dnum_ref[rows, :], dden_ref[rows, :],
                                             mrow_ref[rows, :], rint_ref[rows, :], i_ref[rows, :], lf_ref[rows, :],
                                             ms_ref[t], dc, dn, dm, scale, mm)
        rl_ref[t] = rl
        ra_ref[t] = ra
        return dc, dn, dm

    dc, dn, _ = lax.fori_loop(0, nc, body, (dc_ref[...], dn_ref[...], dm_ref[...]))
    dc0_ref[...], dn0_ref[...] = dc, dn


def _dstates_kernel_grid(q_ref, dnum_ref, dden_ref, mrow_ref, rint_ref, i_ref, lf_ref, ms_ref, dc_ref, dn_ref,
                         dm_ref, dcs_ref, dns_ref, rl_ref, ra_ref, dc0_ref, dn0_ref, dc_scr, dn_scr, dm_scr, *,
                         scale, mm):
    j = pl.program_id(3)  # grid (rows, d_qk tiles, d_v tiles, chunks); the index maps walk the chunks backwards

    @pl.when(j == 0)
    def _init():
        dc_scr[...], dn_scr[...], dm_scr[...] = dc_ref[...], dn_ref[...], dm_ref[...]

    dc, dn, dm = dc_scr[...], dn_scr[...], dm_scr[...]
    dcs_ref[...], dns_ref[...] = dc, dn
    dc, dn, dm, rl, ra = _state_step_bwd(q_ref[...], dnum_ref[...], dden_ref[...], mrow_ref[...], rint_ref[...],
                                         i_ref[...], lf_ref[...], ms_ref[...], dc, dn, dm, scale, mm)
    rl_ref[...], ra_ref[...] = rl, ra
    dc_scr[...], dn_scr[...], dm_scr[...] = dc, dn, dm

    @pl.when(j == pl.num_programs(3) - 1)
    def _done():
        dc0_ref[...], dn0_ref[...] = dc, dn


def _dv_kernel(q_ref, k_ref, dnum_ref, mrow_ref, i_ref, lf_ref, m_ref, dc_ref, dv_ref, *, scale, mm):
    dv = _chunk_dv(q_ref[...], k_ref[...], dnum_ref[...], mrow_ref[...], i_ref[...], lf_ref[...], m_ref[...],
                   dc_ref[...], scale, mm)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dqk_finish(refs, acc, first, *, scale, mm):
    (q_ref, k_ref, qt_ref, kt_ref, dden_ref, mrow_ref, rint_ref, rintra_ref, i_ref, lf_ref, m_ref, n_ref, dn_ref,
     rl_ref, ra_ref, dq_ref, dk_ref, di_ref, dlf_ref) = refs
    dq, dk, di, dlogf = _chunk_dqk(q_ref[...], k_ref[...], qt_ref[...], kt_ref[...], acc, dden_ref[...],
                                   mrow_ref[...], rint_ref[...], rintra_ref[...], i_ref[...], lf_ref[...], m_ref[...],
                                   n_ref[...], dn_ref[...], rl_ref[...], ra_ref[...], first, scale, mm)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    di_ref[...], dlf_ref[...] = di, dlogf


def _first_tile():
    """1.0 in the programs of the first d_qk tile of kernel (2qk) (grid axis 2), else 0.0."""
    return (1 - jnp.minimum(pl.program_id(2), 1)).astype(F32)  # int arithmetic: lowers for Triton and Mosaic


def _dqk_kernel_loop(q_ref, k_ref, qt_ref, kt_ref, v_ref, dnum_ref, dden_ref, mrow_ref, rint_ref, rintra_ref, i_ref,
                     lf_ref, c_ref, n_ref, m_ref, dc_ref, dn_ref, rl_ref, ra_ref, dq_ref, dk_ref, di_ref, dlf_ref, *,
                     wt, nw, scale, mm):
    """Triton: the d_v tiles in a loop (v, dnum: (Y, Wp) blocks; C, dC: (Kt, Wp))."""
    Y, kt = qt_ref.shape

    def body(w, acc):
        cols = pl.ds(pl.multiple_of(w * wt, wt), wt)
        return _dqk_accumulate(acc, v_ref[:, cols], dnum_ref[:, cols], c_ref[:, cols], dc_ref[:, cols], mm)

    if nw == 1:
        acc = _dqk_accumulate(_dqk_zero(Y, kt), v_ref[...], dnum_ref[...], c_ref[...], dc_ref[...], mm)
    else:
        acc = lax.fori_loop(0, nw, body, _dqk_zero(Y, kt))
    _dqk_finish((q_ref, k_ref, qt_ref, kt_ref, dden_ref, mrow_ref, rint_ref, rintra_ref, i_ref, lf_ref, m_ref, n_ref,
                 dn_ref, rl_ref, ra_ref, dq_ref, dk_ref, di_ref, dlf_ref), acc, _first_tile(), scale=scale, mm=mm)


def _dqk_kernel_grid(q_ref, k_ref, qt_ref, kt_ref, v_ref, dnum_ref, dden_ref, mrow_ref, rint_ref, rintra_ref, i_ref,
                     lf_ref, c_ref, n_ref, m_ref, dc_ref, dn_ref, rl_ref, ra_ref, dq_ref, dk_ref, di_ref, dlf_ref,
                     ds_scr, dqs_scr, dkv_scr, cdc_scr, *, scale, mm):
    """TPU: the d_v tiles on the last grid axis ("arbitrary"), accumulated in VMEM scratch; the outputs' blocks
    stay put along it and are written at its last step."""
    w, first = pl.program_id(3), _first_tile()  # (program ids are read outside pl.when: the interpreter wants it)

    @pl.when(w == 0)
    def _init():
        ds_scr[...], dqs_scr[...], dkv_scr[...], cdc_scr[...] = _dqk_zero(*dqs_scr.shape)

    acc = _dqk_accumulate((ds_scr[...], dqs_scr[...], dkv_scr[...], cdc_scr[...]), v_ref[...], dnum_ref[...],
                          c_ref[...], dc_ref[...], mm)
    ds_scr[...], dqs_scr[...], dkv_scr[...], cdc_scr[...] = acc

    @pl.when(w == pl.num_programs(3) - 1)
    def _done():
        _dqk_finish((q_ref, k_ref, qt_ref, kt_ref, dden_ref, mrow_ref, rint_ref, rintra_ref, i_ref, lf_ref, m_ref,
                     n_ref, dn_ref, rl_ref, ra_ref, dq_ref, dk_ref, di_ref, dlf_ref), acc, first, scale=scale, mm=mm)


# --------------------------------------------------------------------------------------------------------------
# pallas_call wrappers (kernel layout)
# --------------------------------------------------------------------------------------------------------------


def _spec_fn(axes: tuple[str, ...], nc: int, reverse: bool = False, copy=None):
    """BlockSpec maker for a grid with named axes: `spec(block, *index)`, each index entry a grid axis name or a
    constant block index. Axis "t" is the chunk (walked backwards if `reverse`); "copy" is `copy(*grid ids)`."""
    def spec(block, *index):
        def index_map(*g):
            env = dict(zip(axes, g))
            if copy is not None:
                env["copy"] = copy(*g)
            if reverse and "t" in env:
                env["t"] = nc - 1 - env["t"]
            return tuple(env[x] if isinstance(x, str) else x for x in index)

        return pl.BlockSpec(block, index_map)

    return spec


def _seq_grid(platform, n, nk, nw, nc, Y, sp, reverse=False):
    """Grid of the sequential kernels (a), (1): Triton (rows, d_qk tiles, d_v tiles) with the chunks in-kernel;
    TPU (rows, d_qk tiles, d_v tiles, chunks). Returns (grid, semantics, spec, seq block, seq index, chunk-axis
    block, index of the per-row copies: one per (d_qk, d_v) tile pair)."""
    copy = lambda b, k, w: k * nw + w  # noqa: E731
    if platform == "triton":
        spec = _spec_fn(("b", "k", "w"), nc, copy=copy)
        return (n, nk, nw), (PAR, PAR, PAR), spec, sp, 0, nc
    spec = _spec_fn(("b", "k", "w", "t"), nc, reverse, copy=lambda b, k, w, t: k * nw + w)
    return (n, nk, nw, nc), (PAR, PAR, PAR, SEQ), spec, Y, "t", None


def _states_call(k, v, i, lf, c0, n0, m0, *, Y, ks, ws, platform, interpret):
    """Kernel (a) on (Ks, Ws) state tiles. Returns chunk-start states C [B*H, Z, Kp, Wp], n [B*H, nW, Z, 1, Kp],
    m [B*H, nK*nW, Z, 1, 1] and the final state C [B*H, Kp, Wp], n [B*H, nW, 1, Kp], m [B*H, nK*nW, 1, 1] (n once
    per d_v tile, m once per tile pair)."""
    n, sp, kp = k.shape
    vp, nc = v.shape[-1], sp // Y
    nk, nw = kp // ks, vp // ws
    grid, sem, spec, yb, t, zb = _seq_grid(platform, n, nk, nw, nc, Y, sp)
    out_shape = (sds((n, nc, kp, vp)), sds((n, nw, nc, 1, kp)), sds((n, nk * nw, nc, 1, 1)),
                 sds((n, kp, vp)), sds((n, nw, 1, kp)), sds((n, nk * nw, 1, 1)))
    col = spec((None, yb, 1), "b", t, 0)
    in_specs = [spec((None, yb, ks), "b", t, "k"), spec((None, yb, ws), "b", t, "w"), col, col,
                spec((None, ks, ws), "b", "k", "w"), spec((None, 1, ks), "b", 0, "k"), spec((None, 1, 1), "b", 0, 0)]
    out_specs = [spec((None, zb, ks, ws), "b", t, "k", "w"), spec((None, None, zb, 1, ks), "b", "w", t, 0, "k"),
                 spec((None, None, zb, 1, 1), "b", "copy", t, 0, 0), spec((None, ks, ws), "b", "k", "w"),
                 spec((None, None, 1, ks), "b", "w", 0, "k"), spec((None, None, 1, 1), "b", "copy", 0, 0)]
    mm = _matmul(platform)
    if platform == "triton":
        kernel, scratch = functools.partial(_states_kernel_loop, Y=Y, nc=nc, mm=mm), ()
    else:
        kernel = functools.partial(_states_kernel_grid, mm=mm)
        scratch = [pltpu.VMEM((ks, ws), F32), pltpu.VMEM((1, ks), F32), pltpu.VMEM((1, 1), F32)]
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch,
        # f32 elements held: the state tile and the chunk's (Y, Y) gate matrices (8 Triton warps at 64 x 64 tiles
        # and Y = 64; 4 warps spilled registers)
        compiler_params=compiler_params(platform, interpret, sem, ks * ws + Y * Y), interpret=interpret,
        name="mlstm_fwd_states",
    )(k, v, i, lf, c0, n0, m0)


def _chunk_specs(nc, Y, kp, wt):
    """Grid (rows, chunks, d_v tiles) of kernels (b), (0), (2v): spec maker and the inputs q, k, v's tile, i,
    log f, C's tile, n, m."""
    spec = _spec_fn(("b", "t", "w"), nc)
    col = spec((None, Y, 1), "b", "t", 0)
    ins = [spec((None, Y, kp), "b", "t", 0), spec((None, Y, kp), "b", "t", 0), spec((None, Y, wt), "b", "t", "w"),
           col, col, spec((None, None, kp, wt), "b", "t", 0, "w"), spec((None, None, 1, kp), "b", "t", 0, 0),
           spec((None, None, 1, 1), "b", "t", 0, 0)]
    return spec, col, ins


def _outputs_call(q, k, v, i, lf, cs, ns, ms, *, Y, wt, scale, eps, platform, interpret):
    """Kernel (b): h [B*H, Sp, Wp] in v's dtype."""
    n, sp, kp = q.shape
    vp, nc = v.shape[-1], sp // Y
    spec, _, in_specs = _chunk_specs(nc, Y, kp, wt)
    return pl.pallas_call(
        functools.partial(_out_kernel, scale=scale, eps=eps, mm=_matmul(platform)),
        out_shape=sds((n, sp, vp), v.dtype), grid=(n, nc, vp // wt), in_specs=in_specs,
        out_specs=spec((None, Y, wt), "b", "t", "w"),
        compiler_params=compiler_params(platform, interpret, (PAR, PAR, PAR), kp * wt),
        interpret=interpret, name="mlstm_fwd_outputs",
    )(q, k, v, i, lf, cs, ns, ms)


def _prep_call(q, k, v, i, lf, cs, ns, ms, dh, *, Y, wt, scale, eps, platform, interpret):
    """Backward kernel (0): dnum [B*H, Sp, Wp]; this tile's part of sum(dh * h), den and m_row, and whether the
    start-state column wins m_row (1.0 / 0.0): [B*H, nW, Sp, 1] (all f32)."""
    n, sp, kp = q.shape
    vp, nc = v.shape[-1], sp // Y
    nw = vp // wt
    spec, _, in_specs = _chunk_specs(nc, Y, kp, wt)
    tile_col = spec((None, None, Y, 1), "b", "w", "t", 0)
    col = sds((n, nw, sp, 1))
    return pl.pallas_call(
        functools.partial(_prep_kernel, scale=scale, eps=eps, mm=_matmul(platform)),
        out_shape=(sds((n, sp, vp)), col, col, col, col), grid=(n, nc, nw),
        in_specs=in_specs + [spec((None, Y, wt), "b", "t", "w")],
        out_specs=[spec((None, Y, wt), "b", "t", "w")] + [tile_col] * 4,
        compiler_params=compiler_params(platform, interpret, (PAR, PAR, PAR), kp * wt), interpret=interpret,
        name="mlstm_bwd_prep",
    )(q, k, v, i, lf, cs, ns, ms, dh)


def _dstates_call(q, dnum, dden, m_row, r_inter, i, lf, ms, dc, dn, dm, *, Y, ks, ws, scale, platform, interpret):
    """Backward kernel (1) on (Ks, Ws) tiles: chunk-end cotangents dC [B*H, Z, Kp, Wp], dn [B*H, nW, Z, 1, Kp]; the
    routed stabiliser gradients rl, ra [B*H, nK*nW, Z, 1, 1]; and d(initial C) [B*H, Kp, Wp], d(initial n)
    [B*H, nW, 1, Kp] (the per-row ones once per d_v tile or tile pair)."""
    n, sp, kp = q.shape
    vp, nc = dnum.shape[-1], sp // Y
    nk, nw = kp // ks, vp // ws
    grid, sem, spec, yb, t, zb = _seq_grid(platform, n, nk, nw, nc, Y, sp, reverse=True)
    out_shape = (sds((n, nc, kp, vp)), sds((n, nw, nc, 1, kp)), sds((n, nk * nw, nc, 1, 1)),
                 sds((n, nk * nw, nc, 1, 1)), sds((n, kp, vp)), sds((n, nw, 1, kp)))
    col = spec((None, yb, 1), "b", t, 0)
    in_specs = [spec((None, yb, ks), "b", t, "k"), spec((None, yb, ws), "b", t, "w"), col, col, col, col, col,
                spec((None, zb, 1, 1), "b", t, 0, 0), spec((None, ks, ws), "b", "k", "w"),
                spec((None, 1, ks), "b", 0, "k"), spec((None, 1, 1), "b", 0, 0)]
    per_row = spec((None, None, zb, 1, 1), "b", "copy", t, 0, 0)
    out_specs = [spec((None, zb, ks, ws), "b", t, "k", "w"), spec((None, None, zb, 1, ks), "b", "w", t, 0, "k"),
                 per_row, per_row, spec((None, ks, ws), "b", "k", "w"), spec((None, None, 1, ks), "b", "w", 0, "k")]
    mm = _matmul(platform)
    if platform == "triton":
        kernel, scratch = functools.partial(_dstates_kernel_loop, Y=Y, nc=nc, scale=scale, mm=mm), ()
    else:
        kernel = functools.partial(_dstates_kernel_grid, scale=scale, mm=mm)
        scratch = [pltpu.VMEM((ks, ws), F32), pltpu.VMEM((1, ks), F32), pltpu.VMEM((1, 1), F32)]
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch,
        # f32 elements held: the state tile and the chunk's (Y, Y) gate matrices (8 Triton warps at 64 x 64 tiles
        # and Y = 64; 4 warps spilled registers)
        compiler_params=compiler_params(platform, interpret, sem, ks * ws + Y * Y), interpret=interpret,
        name="mlstm_bwd_states",
    )(q, dnum, dden, m_row, r_inter, i, lf, ms, dc, dn, dm)


def _dv_call(q, k, dnum, m_row, i, lf, ms, dcs, *, dtype, Y, wt, scale, platform, interpret):
    """Backward kernel (2v): dv [B*H, Sp, Wp] in `dtype` (v's)."""
    n, sp, kp = q.shape
    vp, nc = dnum.shape[-1], sp // Y
    spec = _spec_fn(("b", "t", "w"), nc)
    rows = lambda d: spec((None, Y, d), "b", "t", 0)  # noqa: E731
    in_specs = [rows(kp), rows(kp), spec((None, Y, wt), "b", "t", "w"), rows(1), rows(1), rows(1),
                spec((None, None, 1, 1), "b", "t", 0, 0), spec((None, None, kp, wt), "b", "t", 0, "w")]
    return pl.pallas_call(
        functools.partial(_dv_kernel, scale=scale, mm=_matmul(platform)), out_shape=sds((n, sp, vp), dtype),
        grid=(n, nc, vp // wt), in_specs=in_specs, out_specs=spec((None, Y, wt), "b", "t", "w"),
        compiler_params=compiler_params(platform, interpret, (PAR, PAR, PAR), kp * wt), interpret=interpret,
        name="mlstm_bwd_dv",
    )(q, k, dnum, m_row, i, lf, ms, dcs)


def _dqk_call(q, k, v, dnum, dden, m_row, r_inter, r_intra, i, lf, cs, ns, ms, dcs, dns, rl, ra, *, Y, wt, kt, scale,
              platform, interpret):
    """Backward kernel (2qk): dq, dk [B*H, Sp, Kp] (q's, k's dtypes) and this d_qk tile's part of d(i), d(log f)
    [B*H, nK, Sp, 1]."""
    n, sp, kp = q.shape
    vp, nc = v.shape[-1], sp // Y
    nw, nk = vp // wt, kp // kt
    if platform == "triton":  # the d_v tiles in-kernel
        grid, sem = (n, nc, nk), (PAR, PAR, PAR)
        spec, wb, w = _spec_fn(("b", "t", "k"), nc), vp, 0
    else:
        grid, sem = (n, nc, nk, nw), (PAR, PAR, PAR, SEQ)
        spec, wb, w = _spec_fn(("b", "t", "k", "w"), nc), wt, "w"
    col = spec((None, Y, 1), "b", "t", 0)
    chunk_col = spec((None, None, 1, 1), "b", "t", 0, 0)
    ktile = spec((None, Y, kt), "b", "t", "k")
    in_specs = [spec((None, Y, kp), "b", "t", 0), spec((None, Y, kp), "b", "t", 0), ktile, ktile,
                spec((None, Y, wb), "b", "t", w), spec((None, Y, wb), "b", "t", w), col, col, col, col, col, col,
                spec((None, None, kt, wb), "b", "t", "k", w), spec((None, None, 1, kt), "b", "t", 0, "k"), chunk_col,
                spec((None, None, kt, wb), "b", "t", "k", w), spec((None, None, 1, kt), "b", "t", 0, "k"),
                chunk_col, chunk_col]
    tile_col = spec((None, None, Y, 1), "b", "k", "t", 0)
    out_shape = (sds((n, sp, kp), q.dtype), sds((n, sp, kp), k.dtype), sds((n, nk, sp, 1)), sds((n, nk, sp, 1)))
    mm = _matmul(platform)
    if platform == "triton":
        kernel, scratch = functools.partial(_dqk_kernel_loop, wt=wt, nw=nw, scale=scale, mm=mm), ()
    else:
        kernel = functools.partial(_dqk_kernel_grid, scale=scale, mm=mm)
        scratch = [pltpu.VMEM((Y, Y), F32), pltpu.VMEM((Y, kt), F32), pltpu.VMEM((Y, kt), F32),
                   pltpu.VMEM((1, 1), F32)]
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=[ktile, ktile, tile_col, tile_col],
        scratch_shapes=scratch, compiler_params=compiler_params(platform, interpret, sem, kp * wt),
        interpret=interpret, name="mlstm_bwd_dqk",
    )(q, k, q, k, v, dnum, dden, m_row, r_inter, r_intra, i, lf, cs, ns, ms, dcs, dns, rl, ra)


# --------------------------------------------------------------------------------------------------------------
# Public functions (reference layout)
# --------------------------------------------------------------------------------------------------------------


def _kernel_chunk(chunk: int, s: int) -> int:
    """A power of two >= 16 (Triton arrays and tl.dot; TPU sublanes), no bigger than the padded sequence needs.
    The results do not depend on the chunk size (up to rounding)."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return max(MIN_DIM, min(_next_pow2(chunk), _next_pow2(s)))


def _lane_tile(d: int, cap: int) -> int:
    """The largest multiple of 128 that divides d (a multiple of 128) and is at most cap (>= 128); d if d <= cap."""
    if d <= cap:
        return d
    return max(t for t in range(_LANES, cap + 1, _LANES) if d % t == 0)


def _tiles(kp: int, vp: int, platform: str, block_v: int | None = None, block_k: int | None = None) -> dict:
    """Head-dim tiles, each dividing the padded width: ks x ws, the state tiles of the sequential kernels (a), (1);
    wt, the d_v tile of the parallel kernels (b), (0), (2v); kt, kernel (2qk)'s d_qk tile (its sum over d_v goes
    in ws-wide steps).
    Triton: 64 x 64 state tiles (as TFLA's recurrent kernels: more programs for the sequential sweeps, no
    spills); parallel programs hold (Kp, wt) states of at most 128 x 128 f32 (wt = 128 at Kp 128, 64 at 256, 32
    at 512); (2qk) takes kt = 64 and sums over d_v in ws-wide steps.
    TPU: lane tiles (multiples of 128, or the whole width): ks = Kp up to 512, ws = wt with (ks, wt) at most
    256 x 512 f32; the sums over tiles run on "arbitrary" grid axes.
    `block_v` / `block_k` force the d_v / d_qk tiles (tests; powers of two, or on TPU multiples of 128 - interpret
    mode also takes smaller ones)."""
    if platform == "triton":
        t = dict(ks=min(kp, _TRITON_BLOCK), ws=min(vp, _TRITON_BLOCK), kt=min(kp, _TRITON_BLOCK),
                 wt=max(MIN_DIM, min(vp, _TRITON_TILE_ELEMS // kp)))
        if block_v:
            t["ws"] = t["wt"] = min(block_v, vp)
    else:
        ks = _lane_tile(kp, _TPU_MAX_BLOCK_K)
        wt = _lane_tile(vp, max(_LANES, _TPU_TILE_ELEMS // ks))
        t = dict(ks=ks, ws=wt, kt=ks, wt=wt)
        if block_v:
            t["ws"] = t["wt"] = min(block_v, vp)
    if block_k:
        t["ks"] = t["kt"] = min(block_k, kp)
    return t


def _layout(q, k, v, i, f, c0, n0, m0, chunk, platform, block_v=None, block_k=None):
    """Reference layout -> padded kernel rows. Returns (arrays dict, dims dict)."""
    b, h, s, dk = q.shape
    dv = v.shape[-1]
    Y = _kernel_chunk(chunk, s)
    kp, vp = _pad_dim(dk, platform), _pad_dim(dv, platform)
    tiles = _tiles(kp, vp, platform, block_v, block_k)
    kmul, vmul = max(tiles["ks"], tiles["kt"]), max(tiles["ws"], tiles["wt"])  # the others divide these
    sp, kp, vp = -(-s // Y) * Y, -(-kp // kmul) * kmul, -(-vp // vmul) * vmul
    n = b * h

    def seq(x, d):
        return jnp.pad(x.reshape(n, s, x.shape[-1]), ((0, 0), (0, sp - s), (0, d - x.shape[-1])))

    def col(x, pad_value):
        return jnp.pad(x.astype(F32).reshape(n, s, 1), ((0, 0), (0, sp - s), (0, 0)), constant_values=pad_value)

    arrs = dict(
        q=seq(q, kp), k=seq(k, kp), v=seq(v, vp),
        i=col(i, _PAD_INPUT_GATE), lf=col(jax.nn.log_sigmoid(f.astype(F32)), 0.0),
        c0=jnp.pad(c0.astype(F32).reshape(n, dk, dv), ((0, 0), (0, kp - dk), (0, vp - dv))),
        n0=jnp.pad(n0.astype(F32).reshape(n, 1, dk), ((0, 0), (0, 0), (0, kp - dk))),
        m0=m0.astype(F32).reshape(n, 1, 1),
    )
    dims = dict(b=b, h=h, s=s, dk=dk, dv=dv, Y=Y, sp=sp, kp=kp, vp=vp, scale=float(dk) ** -0.5, **tiles)
    return arrs, dims


def _final_state(c, n, m, d):
    b, h, dk, dv = d["b"], d["h"], d["dk"], d["dv"]
    return c[:, :dk, :dv].reshape(b, h, dk, dv), n[:, 0, :dk].reshape(b, h, dk), m.reshape(b, h)


def _forward_states(a, d, kw):
    """Kernel (a); the per-row states of the first tile: cs, ns, ms, final c, n [B*H, 1, Kp], m [B*H, 1, 1]."""
    cs, ns, ms, c, n, m = _states_call(a["k"], a["v"], a["i"], a["lf"], a["c0"], a["n0"], a["m0"], ks=d["ks"],
                                       ws=d["ws"], **kw)
    return cs, ns[:, 0], ms[:, 0], c, n[:, 0], m[:, 0]


def mlstm_fwd(q_BHSK, k_BHSK, v_BHSW, i_BHS, f_BHS, c0_BHKW, n0_BHK, m0_BH, *, chunk: int, eps: float, platform: str,
              interpret: bool = False, block_v: int | None = None, block_k: int | None = None):
    """Forward: (h [B,H,S,W] in v's dtype, final state (C [B,H,K,W], n [B,H,K], m [B,H]) in float32).
    `block_v` / `block_k` force the head-dim tiles (see `_tiles`; tests)."""
    check_platform(platform)
    a, d = _layout(q_BHSK, k_BHSK, v_BHSW, i_BHS, f_BHS, c0_BHKW, n0_BHK, m0_BH, chunk, platform, block_v, block_k)
    kw = dict(Y=d["Y"], platform=platform, interpret=interpret)
    cs, ns, ms, c, n, m = _forward_states(a, d, kw)
    h = _outputs_call(a["q"], a["k"], a["v"], a["i"], a["lf"], cs, ns, ms, wt=d["wt"], scale=d["scale"], eps=eps,
                      **kw)
    h = h[:, :d["s"], :d["dv"]].reshape(d["b"], d["h"], d["s"], d["dv"])
    return h, _final_state(c, n, m, d)


def mlstm_bwd(q, k, v, i, f, c0, n0, m0, dh_BHSW, dc_BHKW, dn_BHK, *, chunk: int, eps: float, platform: str,
              interpret: bool = False, block_v: int | None = None, block_k: int | None = None):
    """Backward of mlstm_fwd w.r.t. (q, k, v, i, f, c0, n0) for cotangents dh and (dC, dn) of the final state
    (the final m gets none). Returns (dq, dk, dv, di, df, dc0, dn0) in the dtypes of the inputs."""
    check_platform(platform)
    a, d = _layout(q, k, v, i, f, c0, n0, m0, chunk, platform, block_v, block_k)
    nr, kp, vp, sp, wt = a["q"].shape[0], d["kp"], d["vp"], d["sp"], d["wt"]
    kw = dict(Y=d["Y"], platform=platform, interpret=interpret)
    cs, ns, ms, c_fin, n_fin, _ = _forward_states(a, d, kw)
    dh = jnp.pad(dh_BHSW.astype(F32).reshape(nr, d["s"], d["dv"]), ((0, 0), (0, sp - d["s"]), (0, vp - d["dv"])))
    dnum, dsum, den, m_row, inter = _prep_call(a["q"], a["k"], a["v"], a["i"], a["lf"], cs, ns, ms, dh, wt=wt,
                                               scale=d["scale"], eps=eps, **kw)
    den, m_row = den[:, 0], m_row[:, 0]
    dden, r_inter, r_intra = _prep_terms(jnp.sum(dsum, axis=1), den, m_row, inter[:, 0] > 0.5, eps)
    dc = jnp.pad(dc_BHKW.astype(F32).reshape(nr, d["dk"], d["dv"]), ((0, 0), (0, kp - d["dk"]), (0, vp - d["dv"])))
    dn = jnp.pad(dn_BHK.astype(F32).reshape(nr, 1, d["dk"]), ((0, 0), (0, 0), (0, kp - d["dk"])))
    # The final state is true state * exp(-m_final): its cotangent reaches m_final with this weight.
    dm = -(jnp.sum(c_fin * dc, axis=(1, 2)) + jnp.sum(n_fin * dn, axis=(1, 2))).reshape(nr, 1, 1)
    dcs, dns, rl, ra, dc0, dn0 = _dstates_call(a["q"], dnum, dden, m_row, r_inter, a["i"], a["lf"], ms, dc, dn, dm,
                                               ks=d["ks"], ws=d["ws"], scale=d["scale"], **kw)
    dns, rl, ra, dn0 = dns[:, 0], rl[:, 0], ra[:, 0], dn0[:, 0]
    dv = _dv_call(a["q"], a["k"], dnum, m_row, a["i"], a["lf"], ms, dcs, dtype=v.dtype, wt=wt, scale=d["scale"],
                  **kw)
    dq, dk, di, dlf = _dqk_call(a["q"], a["k"], a["v"], dnum, dden, m_row, r_inter, r_intra, a["i"], a["lf"], cs, ns,
                                ms, dcs, dns, rl, ra, wt=d["ws"], kt=d["kt"], scale=d["scale"], **kw)
    di, dlf = jnp.sum(di, axis=1), jnp.sum(dlf, axis=1)  # the d_qk tiles' parts
    b, h, s, dk_, dv_ = d["b"], d["h"], d["s"], d["dk"], d["dv"]
    unrow = lambda x, w: x[:, :s, :w].reshape(b, h, s, w)  # noqa: E731
    di = di[:, :s, 0].reshape(b, h, s)
    df = dlf[:, :s, 0].reshape(b, h, s) * jax.nn.sigmoid(-f.astype(F32))  # d logsigmoid(f) / df = sigmoid(-f)
    return (unrow(dq, dk_), unrow(dk, dk_), unrow(dv, dv_), di.astype(i.dtype),
            df.astype(f.dtype), dc0[:, :dk_, :dv_].reshape(b, h, dk_, dv_).astype(c0.dtype),
            dn0[:, 0, :dk_].reshape(b, h, dk_).astype(n0.dtype))
