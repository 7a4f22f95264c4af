"""Pallas kernels for the mLSTM cell (xLSTM): chunkwise forward and backward, TFLA-style.

Public functions take the layout of reference.py (q_BHSK, k_BHSK, v_BHSW, gate pre-activations i_BHS, f_BHS,
state (C_BHKW, n_BHK, m_BH)) and pad inside; the kernels see B*H rows (flattened (batch, head) pairs):
    q, k: [B*H, Sp, Kp]   v, dnum: [B*H, Sp, Wp]   per-step scalars (i, log f, ...): [B*H, Sp, 1] f32
    chunk-start states: C [B*H, Z, Kp, Wp], n [B*H, Z, 1, Kp], m [B*H, Z, 1, 1] (all f32; Z chunks)
Sp is S padded to a multiple of the chunk length Y (padded steps: input gate -1e30, log f = 0, so they change
nothing); Kp/Wp are the head widths K/W padded with zeros (power of two >= 16: Triton arrays and tl.dot;
multiples of 128 above 128 on TPU). The q scale is always the true d_qk**-0.5. Per-step scalars are columns
(Y, 1); where a row (1, Y) is needed it is made in-kernel with a masked diagonal sum (no transposes, so the same
code lowers for both backends).

Kernels (each has a "triton" body: grid over rows, chunk loop in-kernel; and a "tpu" body: grid (rows, chunks)
with the chunk axis "arbitrary" and the carried state in VMEM scratch; the parallel kernels share one body):
  forward  (a) states:      sequential over chunks -> chunk-start states (C_k, n_k, m_k) and the final state
           (b) outputs:     parallel over (row, chunk) -> h from the chunk-start state and the chunk's own rows
  backward (0) prep:        kernel (b) again with dh: per-row dnum = dh / denom, d(den), and the stabiliser terms
           (1) state grads: reverse sequential over chunks, carrying (dC, dn) and the routed d(m) (see below);
                            what is left at the start is (dc0, dn0)
           (2) chunk grads: parallel over (row, chunk) -> dq, dk, dv, d(i), d(log f)
  mlstm_bwd first reruns forward kernel (a): the op saves only the inputs. Glue in jnp (O(S) or O(K W) per row):
  padding, log f, the final state's d(m) weight, and d f = d(log f) * sigmoid(-f).
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
unrolled FMAs, which made ptxas take minutes on the backward kernel). The Triton parallel kernels run 8 warps
at these tile sizes, as the sequential ones do (4 warps spilled the (Kp, Wp) f32 states: slow compiles).

Not done yet: head-dim tiling. Every program holds a whole (Kp, Wp) f32 state (and the parallel kernels the
(Y, Y) matrices), which suits d_qk, d_v <= 128; xLSTM-7B sizes (256 x 512) need d_v tiles (and, in the backward,
TFLA's split into dQ / dK / dV kernels, since d(den) and the score gradients sum over all of d_v). Untuned: no
GPU or TPU was available; only interpret-mode runs and cuda/tpu lowering were checked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..common import (F32, MIN_DIM, PAR, PLATFORMS, SEQ, check_platform,
                      compiler_params, dot as _dot, next_pow2 as _next_pow2, pad_dim as _pad_dim, sds)

_PAD_INPUT_GATE = -1e30  # as reference.pad_to_chunks: exp(-1e30 - m) == 0


# --------------------------------------------------------------------------------------------------------------
# In-kernel math (arrays in, arrays out; shared by both bodies)
# --------------------------------------------------------------------------------------------------------------


def _bf16_parts(x, n: int):
    """x (float32) as n bfloat16 terms, largest first: x = sum(parts) exactly for n = 3 (3 x 8 significant bits;
    each remainder x - part is exact in float32), barring underflow below float32's normal range."""
    parts = []
    for _ in range(n):
        p = x.astype(jnp.bfloat16)
        parts.append(p)
        x = x - p.astype(F32)
    return parts


def _split_dot(a, b, contract_a: int, contract_b: int):
    """Triton's matmul at float32 accuracy on bf16 tensor cores, accumulated in float32.

    A float32 operand is split into 3 bf16 terms (exact); products of bf16 terms are exact in float32, so a
    bf16 x f32 matmul is 3 bf16 matmuls with the result of the float32 one up to the order of the float32 sums.
    f32 x f32 keeps the 6 products hi.hi .. lo.hi whose scale is >= 2^-16 of the leading one (the 3 dropped ones
    are <= 2^-24 relative: float32 rounding). Why not `_dot` (precision HIGHEST): Triton lowers a float32 dot
    as IEEE FMAs, not tensor-core instructions; at (64, 128) x (128, 128) that is thousands of unrolled FMAs
    per thread, which took ptxas minutes per kernel (and runs far slower)."""
    dims = (((contract_a,), (contract_b,)), ((), ()))
    if a.dtype == b.dtype and a.dtype in (jnp.bfloat16, jnp.float16):
        return lax.dot_general(a, b, dims, preferred_element_type=F32)
    if not all(x.dtype in (jnp.bfloat16, jnp.float16, F32) for x in (a, b)):  # float64: the plain dot
        return _dot(a, b, contract_a, contract_b)
    pa, pb = ([x] if x.dtype == jnp.bfloat16 else _bf16_parts(x.astype(F32), 3) for x in (a, b))
    terms = [(x, y) for ia, x in enumerate(pa) for ib, y in enumerate(pb) if ia + ib <= 2]
    out = None
    for x, y in reversed(terms):  # smallest terms first
        t = lax.dot_general(x, y, dims, preferred_element_type=F32)
        out = t if out is None else out + t
    return out


def _matmul(platform: str):
    """The in-kernel matmul of a body: bf16 tensor-core splits for Triton; Mosaic's float32 matmul (HIGHEST) on
    TPU, which compiles in seconds."""
    return _split_dot if platform == "triton" else _dot


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
    """State after one chunk from the state before it (the same maths as reference.chunk_states)."""
    gt = _gates(i_Y1, logf_Y1, m_11)
    m_next = gt["m_next_11"]
    decay = jnp.exp(gt["l_11"] - m_next)
    kw = k.astype(F32) * jnp.exp(gt["a_Y1"] - m_next)
    c_KW = decay * c_KW + mm(kw, v, 0, 0)
    n_1K = decay * n_1K + jnp.sum(kw, axis=0, keepdims=True)
    return c_KW, n_1K, m_next


def _chunk_num_den(q, k, v, i_Y1, logf_Y1, c_KW, n_1K, m_11, scale, mm):
    """Unnormalised chunk outputs (num (Y, Wp), den (Y, 1)) and the row stabiliser terms."""
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


def _prep_terms(num, den, m_row, inter_wins, dh, eps: float):
    """Per-row backward inputs from dh: dnum = dh/denom; d(den) (only where |den| beats the floor); and the
    row stabiliser's gradient -eps*sum(dh*h)/denom (same in both branches of the max), split by which log
    weight attains m_row: the start-state column (r_inter) or the chunk's own rows (r_intra)."""
    denom, den_wins = _denom(den, m_row, eps)
    inv = 1.0 / denom
    dh = dh.astype(F32)
    dsum = jnp.sum(dh * num, axis=1, keepdims=True) * inv  # sum(dh * h)
    sign = jnp.where(den >= 0, 1.0, -1.0)
    dden = jnp.where(den_wins, -dsum * inv * sign, 0.0)
    dm_row = -eps * dsum * inv
    r_inter = jnp.where(inter_wins, dm_row, 0.0)
    return dh * inv, dden, r_inter, dm_row - r_inter


def _state_step_bwd(q, dnum, dden_Y1, m_row_Y1, r_inter_Y1, i_Y1, logf_Y1, m_11, dc_KW, dn_1K, dm_11, scale, mm):
    """Cotangents of the chunk-start state from those of the chunk-end state. dm is the routed gradient of the
    chunk-end stabiliser m_{k+1}; it goes to the start state's weight l = g + m_k (rl, passed on to m_k) or to
    the winning row a_tau (ra)."""
    gt = _gates(i_Y1, logf_Y1, m_11)
    l_wins = gt["l_11"] >= gt["amax_11"]
    rl = jnp.where(l_wins, dm_11, 0.0)
    decay = jnp.exp(gt["l_11"] - gt["m_next_11"])
    qw = q.astype(F32) * (jnp.exp(gt["b_Y1"] + m_11 - m_row_Y1) * scale)
    dc_KW = decay * dc_KW + mm(qw, dnum, 0, 0)
    dn_1K = decay * dn_1K + jnp.sum(qw * dden_Y1, axis=0, keepdims=True)
    dm_prev = rl + jnp.sum(r_inter_Y1, axis=0, keepdims=True)
    return dc_KW, dn_1K, dm_prev, rl, dm_11 - rl


def _suffix_sum(x_Y1):
    """y_r = sum_{t >= r} x_t, as a column."""
    r, c = _iotas(x_Y1.shape[0])
    return jnp.sum(jnp.where(c >= r, _col_to_row(x_Y1), 0.0), axis=1, keepdims=True)


def _chunk_grads(q, k, v, dnum, dden, m_row, r_inter, r_intra, i_Y1, logf_Y1, c_KW, n_1K, m_11, dc_KW, dn_1K,
                 rl_11, ra_11, scale, mm):
    """dq, dk, dv, d(i), d(log f) of one chunk.

    G (Y, Y) and G0 (Y, 1) are the gradients w.r.t. the log weights logD_ts and b_t + m_k of the outputs, Ga and
    Gl those of the chunk-end state's log weights a_tau and g + m_k; the gate gradients follow from
    logD_ts = b_t - b_s + i_s, a_tau = g - b_tau + i_tau and b, g being sums of log f.
    """
    f32 = lambda x: x.astype(F32)  # noqa: E731
    gt = _gates(i_Y1, logf_Y1, m_11)
    logD, m_inter, m_intra, _ = _row_logw(i_Y1, gt, m_11)
    dmat = jnp.exp(logD - m_row)
    s = mm(q, k, 1, 1) * scale * dmat
    ds = mm(dnum, v, 1, 1) + dden  # d(score_ts)
    dp = ds * dmat * scale  # d(q_t . k_s)
    wq = jnp.exp(m_inter - m_row) * scale
    dq_state = mm(dnum, c_KW, 1, 1) + dden * n_1K  # (Y, Kp), before the row weight wq
    dq = mm(dp, k, 1, 0) + dq_state * wq
    # Chunk-end state: C_{k+1} gets exp(a_tau - m_{k+1}) k_tau v_tau^T.
    wk = jnp.exp(gt["a_Y1"] - gt["m_next_11"])
    dk_state = (mm(v, dc_KW, 1, 1) + dn_1K) * wk
    dk = mm(dp, q, 0, 0) + dk_state
    dv = mm(s, dnum, 0, 0) + mm(k, dc_KW, 1, 0) * wk
    # Log-weight gradients, plus the routed stabiliser gradients (see the module docstring).
    g_mat = ds * s + jnp.where(logD == m_intra, r_intra, 0.0)
    g0 = jnp.sum(f32(q) * dq_state, axis=1, keepdims=True) * wq + r_inter
    ga = jnp.sum(f32(k) * dk_state, axis=1, keepdims=True) + jnp.where(gt["a_Y1"] == gt["amax_11"], ra_11, 0.0)
    gl = jnp.exp(gt["l_11"] - gt["m_next_11"]) * (_sum_all(c_KW * dc_KW) + _sum_all(n_1K * dn_1K)) + rl_11
    col_g = _row_to_col(jnp.sum(g_mat, axis=0, keepdims=True))  # sum over t of G_ts, as a column over s
    di = col_g + ga
    db = jnp.sum(g_mat, axis=1, keepdims=True) - col_g + g0 - ga  # d(b_t)
    dlogf = _suffix_sum(db) + (jnp.sum(ga, axis=0, keepdims=True) + gl)  # b_t sums log f up to t; g sums all
    return dq, dk, dv, di, dlogf


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
    t = pl.program_id(1)

    @pl.when(t == 0)
    def _init():
        c_scr[...], n_scr[...], m_scr[...] = c0_ref[...], n0_ref[...], m0_ref[...]

    c, n, m = c_scr[...], n_scr[...], m_scr[...]
    cs_ref[...], ns_ref[...], ms_ref[...] = c, n, m
    c, n, m = _state_step(k_ref[...], v_ref[...], i_ref[...], lf_ref[...], c, n, m, mm)
    c_scr[...], n_scr[...], m_scr[...] = c, n, m

    @pl.when(t == pl.num_programs(1) - 1)
    def _done():
        c_ref[...], n_ref[...], m_ref[...] = c, n, m


def _out_kernel(q_ref, k_ref, v_ref, i_ref, lf_ref, c_ref, n_ref, m_ref, h_ref, *, scale, eps, mm):
    num, den, m_row, _ = _chunk_num_den(q_ref[...], k_ref[...], v_ref[...], i_ref[...], lf_ref[...], c_ref[...],
                                        n_ref[...], m_ref[...], scale, mm)
    h_ref[...] = (num / _denom(den, m_row, eps)[0]).astype(h_ref.dtype)


def _prep_kernel(q_ref, k_ref, v_ref, i_ref, lf_ref, c_ref, n_ref, m_ref, dh_ref, dnum_ref, mrow_ref, dden_ref,
                 rint_ref, rintra_ref, *, scale, eps, mm):
    num, den, m_row, inter_wins = _chunk_num_den(q_ref[...], k_ref[...], v_ref[...], i_ref[...], lf_ref[...],
                                                 c_ref[...], n_ref[...], m_ref[...], scale, mm)
    dnum, dden, r_inter, r_intra = _prep_terms(num, den, m_row, inter_wins, dh_ref[...], eps)
    dnum_ref[...], mrow_ref[...], dden_ref[...] = dnum, m_row, dden
    rint_ref[...], rintra_ref[...] = r_inter, r_intra


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
    j = pl.program_id(1)  # the index maps walk the chunks backwards

    @pl.when(j == 0)
    def _init():
        dc_scr[...], dn_scr[...], dm_scr[...] = dc_ref[...], dn_ref[...], dm_ref[...]

    dc, dn, dm = dc_scr[...], dn_scr[...], dm_scr[...]
    dcs_ref[...], dns_ref[...] = dc, dn
    dc, dn, dm, rl, ra = _state_step_bwd(q_ref[...], dnum_ref[...], dden_ref[...], mrow_ref[...], rint_ref[...],
                                         i_ref[...], lf_ref[...], ms_ref[...], dc, dn, dm, scale, mm)
    rl_ref[...], ra_ref[...] = rl, ra
    dc_scr[...], dn_scr[...], dm_scr[...] = dc, dn, dm

    @pl.when(j == pl.num_programs(1) - 1)
    def _done():
        dc0_ref[...], dn0_ref[...] = dc, dn


def _grads_kernel(q_ref, k_ref, v_ref, dnum_ref, dden_ref, mrow_ref, rint_ref, rintra_ref, i_ref, lf_ref, c_ref,
                  n_ref, m_ref, dc_ref, dn_ref, rl_ref, ra_ref, dq_ref, dk_ref, dv_ref, di_ref, dlf_ref, *, scale, mm):
    dq, dk, dv, di, dlogf = _chunk_grads(
        q_ref[...], k_ref[...], v_ref[...], dnum_ref[...], dden_ref[...], mrow_ref[...], rint_ref[...],
        rintra_ref[...], i_ref[...], lf_ref[...], c_ref[...], n_ref[...], m_ref[...], dc_ref[...], dn_ref[...],
        rl_ref[...], ra_ref[...], scale, mm)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    di_ref[...], dlf_ref[...] = di, dlogf


# --------------------------------------------------------------------------------------------------------------
# pallas_call wrappers (kernel layout)
# --------------------------------------------------------------------------------------------------------------


class _Specs:
    """BlockSpecs of the kernel layout. per_chunk=False: grid (B*H,), each program sees whole rows (the Triton
    sequential kernels loop over chunks inside). per_chunk=True: grid (B*H, Z), one chunk per program; `reverse`
    walks the chunks backwards. rows(d): [B*H, Sp, d] arrays; chunk_state(a, c): [B*H, Z, a, c] per-chunk states;
    row_state(a, c): [B*H, a, c] per-row states (resident across the chunk axis)."""

    def __init__(self, Y: int, sp: int, nc: int, per_chunk: bool, reverse: bool = False):
        self.per_chunk = per_chunk
        if per_chunk:
            t = (lambda j: nc - 1 - j) if reverse else (lambda j: j)
            self.rows = lambda d: pl.BlockSpec((None, Y, d), lambda b, j: (b, t(j), 0))
            self.chunk_state = lambda a, c: pl.BlockSpec((None, None, a, c), lambda b, j: (b, t(j), 0, 0))
            self.row_state = lambda a, c: pl.BlockSpec((None, a, c), lambda b, j: (b, 0, 0))
        else:
            self.rows = lambda d: pl.BlockSpec((None, sp, d), lambda b: (b, 0, 0))
            self.chunk_state = lambda a, c: pl.BlockSpec((None, nc, a, c), lambda b: (b, 0, 0, 0))
            self.row_state = lambda a, c: pl.BlockSpec((None, a, c), lambda b: (b, 0, 0))


def _states_call(k, v, i, lf, c0, n0, m0, *, Y, platform, interpret):
    """Kernel (a). Returns chunk-start states (C, n, m) and the final state."""
    n, sp, kp = k.shape
    vp, nc = v.shape[-1], sp // Y
    out_shape = (sds((n, nc, kp, vp)), sds((n, nc, 1, kp)), sds((n, nc, 1, 1)),
                 sds((n, kp, vp)), sds((n, 1, kp)), sds((n, 1, 1)))
    specs = _Specs(Y, sp, nc, per_chunk=platform == "tpu")
    in_specs = [specs.rows(kp), specs.rows(vp), specs.rows(1), specs.rows(1), specs.row_state(kp, vp),
                specs.row_state(1, kp), specs.row_state(1, 1)]
    out_specs = [specs.chunk_state(kp, vp), specs.chunk_state(1, kp), specs.chunk_state(1, 1), specs.row_state(kp, vp),
                 specs.row_state(1, kp), specs.row_state(1, 1)]
    if platform == "triton":
        kernel, grid, scratch = functools.partial(_states_kernel_loop, Y=Y, nc=nc, mm=_matmul(platform)), (n,), ()
    else:
        kernel, grid = functools.partial(_states_kernel_grid, mm=_matmul(platform)), (n, nc)
        scratch = [pltpu.VMEM((kp, vp), F32), pltpu.VMEM((1, kp), F32), pltpu.VMEM((1, 1), F32)]
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch,
        compiler_params=compiler_params(platform, interpret, (PAR, SEQ), kp * vp), interpret=interpret,
        name="mlstm_fwd_states",
    )(k, v, i, lf, c0, n0, m0)


def _chunk_in_specs(specs, kp, vp):
    """q, k, v, i, log f, chunk-start C, n, m."""
    return [specs.rows(kp), specs.rows(kp), specs.rows(vp), specs.rows(1), specs.rows(1), specs.chunk_state(kp, vp),
            specs.chunk_state(1, kp), specs.chunk_state(1, 1)]


def _outputs_call(q, k, v, i, lf, cs, ns, ms, *, Y, scale, eps, platform, interpret):
    """Kernel (b): h [B*H, Sp, Wp] in v's dtype."""
    n, sp, kp = q.shape
    vp, nc = v.shape[-1], sp // Y
    specs = _Specs(Y, sp, nc, per_chunk=True)
    return pl.pallas_call(
        functools.partial(_out_kernel, scale=scale, eps=eps, mm=_matmul(platform)),
        out_shape=sds((n, sp, vp), v.dtype), grid=(n, nc), in_specs=_chunk_in_specs(specs, kp, vp),
        out_specs=specs.rows(vp), compiler_params=compiler_params(platform, interpret, (PAR, PAR), kp * vp),
        interpret=interpret, name="mlstm_fwd_outputs",
    )(q, k, v, i, lf, cs, ns, ms)


def _prep_call(q, k, v, i, lf, cs, ns, ms, dh, *, Y, scale, eps, platform, interpret):
    """Backward kernel (0): dnum [B*H, Sp, Wp]; m_row, d(den), r_inter, r_intra [B*H, Sp, 1] (all f32)."""
    n, sp, kp = q.shape
    vp, nc = v.shape[-1], sp // Y
    specs = _Specs(Y, sp, nc, per_chunk=True)
    col = sds((n, sp, 1))
    return pl.pallas_call(
        functools.partial(_prep_kernel, scale=scale, eps=eps, mm=_matmul(platform)),
        out_shape=(sds((n, sp, vp)), col, col, col, col), grid=(n, nc),
        in_specs=_chunk_in_specs(specs, kp, vp) + [specs.rows(vp)],
        out_specs=[specs.rows(vp)] + [specs.rows(1)] * 4,
        compiler_params=compiler_params(platform, interpret, (PAR, PAR), kp * vp), interpret=interpret,
        name="mlstm_bwd_prep",
    )(q, k, v, i, lf, cs, ns, ms, dh)


def _dstates_call(q, dnum, dden, m_row, r_inter, i, lf, ms, dc, dn, dm, *, Y, scale, platform, interpret):
    """Backward kernel (1): chunk-end cotangents dC [B*H, Z, Kp, Wp], dn [B*H, Z, 1, Kp]; the routed stabiliser
    gradients rl, ra [B*H, Z, 1, 1]; and d(initial C, n)."""
    n, sp, kp = q.shape
    vp, nc = dnum.shape[-1], sp // Y
    out_shape = (sds((n, nc, kp, vp)), sds((n, nc, 1, kp)), sds((n, nc, 1, 1)), sds((n, nc, 1, 1)),
                 sds((n, kp, vp)), sds((n, 1, kp)))
    specs = _Specs(Y, sp, nc, per_chunk=platform == "tpu", reverse=True)
    in_specs = [specs.rows(kp), specs.rows(vp)] + [specs.rows(1)] * 5 + [
        specs.chunk_state(1, 1), specs.row_state(kp, vp), specs.row_state(1, kp), specs.row_state(1, 1)]
    out_specs = [specs.chunk_state(kp, vp), specs.chunk_state(1, kp), specs.chunk_state(1, 1), specs.chunk_state(1, 1),
                 specs.row_state(kp, vp), specs.row_state(1, kp)]
    if platform == "triton":
        kernel = functools.partial(_dstates_kernel_loop, Y=Y, nc=nc, scale=scale, mm=_matmul(platform))
        grid, scratch = (n,), ()
    else:
        kernel, grid = functools.partial(_dstates_kernel_grid, scale=scale, mm=_matmul(platform)), (n, nc)
        scratch = [pltpu.VMEM((kp, vp), F32), pltpu.VMEM((1, kp), F32), pltpu.VMEM((1, 1), F32)]
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch,
        compiler_params=compiler_params(platform, interpret, (PAR, SEQ), kp * vp), interpret=interpret,
        name="mlstm_bwd_states",
    )(q, dnum, dden, m_row, r_inter, i, lf, ms, dc, dn, dm)


def _grads_call(q, k, v, dnum, dden, m_row, r_inter, r_intra, i, lf, cs, ns, ms, dcs, dns, rl, ra, *, Y, scale,
                platform, interpret):
    """Backward kernel (2): dq, dk, dv (input dtypes) and d(i), d(log f) [B*H, Sp, 1] f32."""
    n, sp, kp = q.shape
    vp, nc = v.shape[-1], sp // Y
    specs = _Specs(Y, sp, nc, per_chunk=True)
    col = specs.rows(1)
    in_specs = [specs.rows(kp), specs.rows(kp), specs.rows(vp), specs.rows(vp), col, col, col, col, col, col,
                specs.chunk_state(kp, vp), specs.chunk_state(1, kp), specs.chunk_state(1, 1), specs.chunk_state(kp, vp),
                specs.chunk_state(1, kp), specs.chunk_state(1, 1), specs.chunk_state(1, 1)]
    out_shape = (sds((n, sp, kp), q.dtype), sds((n, sp, kp), k.dtype), sds((n, sp, vp), v.dtype),
                 sds((n, sp, 1)), sds((n, sp, 1)))
    return pl.pallas_call(
        functools.partial(_grads_kernel, scale=scale, mm=_matmul(platform)), out_shape=out_shape, grid=(n, nc),
        in_specs=in_specs, out_specs=[specs.rows(kp), specs.rows(kp), specs.rows(vp), col, col],
        compiler_params=compiler_params(platform, interpret, (PAR, PAR), kp * vp), interpret=interpret,
        name="mlstm_bwd_grads",
    )(q, k, v, dnum, dden, m_row, r_inter, r_intra, i, lf, cs, ns, ms, dcs, dns, rl, ra)


# --------------------------------------------------------------------------------------------------------------
# Public functions (reference layout)
# --------------------------------------------------------------------------------------------------------------


def _kernel_chunk(chunk: int, s: int) -> int:
    """A power of two >= 16 (Triton arrays and tl.dot; TPU sublanes), no bigger than the padded sequence needs.
    The results do not depend on the chunk size (up to rounding)."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return max(MIN_DIM, min(_next_pow2(chunk), _next_pow2(s)))


def _layout(q, k, v, i, f, c0, n0, m0, chunk, platform):
    """Reference layout -> padded kernel rows. Returns (arrays dict, dims dict)."""
    b, h, s, dk = q.shape
    dv = v.shape[-1]
    Y = _kernel_chunk(chunk, s)
    sp, kp, vp = -(-s // Y) * Y, _pad_dim(dk, platform), _pad_dim(dv, platform)
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
    dims = dict(b=b, h=h, s=s, dk=dk, dv=dv, Y=Y, sp=sp, kp=kp, vp=vp, scale=float(dk) ** -0.5)
    return arrs, dims


def _final_state(c, n, m, d):
    b, h, dk, dv = d["b"], d["h"], d["dk"], d["dv"]
    return c[:, :dk, :dv].reshape(b, h, dk, dv), n[:, 0, :dk].reshape(b, h, dk), m.reshape(b, h)


def mlstm_fwd(q_BHSK, k_BHSK, v_BHSW, i_BHS, f_BHS, c0_BHKW, n0_BHK, m0_BH, *, chunk: int, eps: float, platform: str,
              interpret: bool = False):
    """Forward: (h [B,H,S,W] in v's dtype, final state (C [B,H,K,W], n [B,H,K], m [B,H]) in float32)."""
    check_platform(platform)
    a, d = _layout(q_BHSK, k_BHSK, v_BHSW, i_BHS, f_BHS, c0_BHKW, n0_BHK, m0_BH, chunk, platform)
    kw = dict(Y=d["Y"], platform=platform, interpret=interpret)
    cs, ns, ms, c, n, m = _states_call(a["k"], a["v"], a["i"], a["lf"], a["c0"], a["n0"], a["m0"], **kw)
    h = _outputs_call(a["q"], a["k"], a["v"], a["i"], a["lf"], cs, ns, ms, scale=d["scale"], eps=eps, **kw)
    h = h[:, :d["s"], :d["dv"]].reshape(d["b"], d["h"], d["s"], d["dv"])
    return h, _final_state(c, n, m, d)


def mlstm_bwd(q, k, v, i, f, c0, n0, m0, dh_BHSW, dc_BHKW, dn_BHK, *, chunk: int, eps: float, platform: str,
              interpret: bool = False):
    """Backward of mlstm_fwd w.r.t. (q, k, v, i, f, c0, n0) for cotangents dh and (dC, dn) of the final state
    (the final m gets none). Returns (dq, dk, dv, di, df, dc0, dn0) in the dtypes of the inputs."""
    check_platform(platform)
    a, d = _layout(q, k, v, i, f, c0, n0, m0, chunk, platform)
    nr, kp, vp, sp = a["q"].shape[0], d["kp"], d["vp"], d["sp"]
    kw = dict(Y=d["Y"], platform=platform, interpret=interpret)
    cs, ns, ms, c_fin, n_fin, _ = _states_call(a["k"], a["v"], a["i"], a["lf"], a["c0"], a["n0"], a["m0"], **kw)
    dh = jnp.pad(dh_BHSW.astype(F32).reshape(nr, d["s"], d["dv"]), ((0, 0), (0, sp - d["s"]), (0, vp - d["dv"])))
    dnum, m_row, dden, r_inter, r_intra = _prep_call(a["q"], a["k"], a["v"], a["i"], a["lf"], cs, ns, ms, dh,
                                                     scale=d["scale"], eps=eps, **kw)
    dc = jnp.pad(dc_BHKW.astype(F32).reshape(nr, d["dk"], d["dv"]), ((0, 0), (0, kp - d["dk"]), (0, vp - d["dv"])))
    dn = jnp.pad(dn_BHK.astype(F32).reshape(nr, 1, d["dk"]), ((0, 0), (0, 0), (0, kp - d["dk"])))
    # The final state is true state * exp(-m_final): its cotangent reaches m_final with this weight.
    dm = -(jnp.sum(c_fin * dc, axis=(1, 2)) + jnp.sum(n_fin * dn, axis=(1, 2))).reshape(nr, 1, 1)
    dcs, dns, rl, ra, dc0, dn0 = _dstates_call(a["q"], dnum, dden, m_row, r_inter, a["i"], a["lf"], ms, dc, dn, dm,
                                               scale=d["scale"], **kw)
    dq, dk, dv, di, dlf = _grads_call(a["q"], a["k"], a["v"], dnum, dden, m_row, r_inter, r_intra, a["i"], a["lf"],
                                      cs, ns, ms, dcs, dns, rl, ra, scale=d["scale"], **kw)
    b, h, s, dk_, dv_ = d["b"], d["h"], d["s"], d["dk"], d["dv"]
    unrow = lambda x, w: x[:, :s, :w].reshape(b, h, s, w)  # noqa: E731
    di = di[:, :s, 0].reshape(b, h, s)
    df = dlf[:, :s, 0].reshape(b, h, s) * jax.nn.sigmoid(-f.astype(F32))  # d logsigmoid(f) / df = sigmoid(-f)
    return (unrow(dq, dk_), unrow(dk, dk_), unrow(dv, dv_), di.astype(i.dtype), df.astype(f.dtype),
            dc0[:, :dk_, :dv_].reshape(b, h, dk_, dv_).astype(c0.dtype),
            dn0[:, 0, :dk_].reshape(b, h, dk_).astype(n0.dtype))
