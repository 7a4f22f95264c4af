"""The mLSTM cell over a sequence split across devices: one all-gather of each chunk's (C, n, m, log F) per layer.

Inside a `shard_map` where device g holds the contiguous chunk g (length L) of every row:

    a_s      = i_s + sum_{r>s} log f_r                  log weight of token s in this chunk's final state
    m_g      = max_s a_s                                 its stabiliser (from no history at all)
    C_g, n_g = sum_s exp(a_s - m_g) k_s v_s^T, ... k_s   one matmul
    F_g      = sum_s log f_s                             how much the chunk decays what enters it
    all      = all_gather(C, n, m, F)                    the only communication; its size is independent of L

The state entering chunk g is the recurrence's own from the run's zero start (C = n = 0, m = 0), combined exactly
in log space: chunk j's state arrives with log weight m_j + sum_{j<r<g} F_r, the zero start with sum_{r<g} F_r,
and m_in is the largest of them. The op then continues from (C_in, n_in, m_in) on the local chunk. m is a
stabiliser, not differentiated (as in the op); gradients reach C and n through the op's VJP and the all-gather's
transpose (a reduce-scatter: the reverse prefix of state gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.sequence_parallel import chunks_between, earlier_chunks, gather_chunks, reverse_exclusive_cumsum

from . import reference as _ref
from .ops import mlstm


def chunk_state(k_BSHK, v_BSHW, i_BSH, f_BSH):
    """(C [B,H,K,W], n [B,H,K], m [B,H], F [B,H]): this chunk's final state from no history, and its total
    log forget gate."""
    acc = _ref.acc_dtype(k_BSHK, v_BSHW, i_BSH, f_BSH)
    logf_BSH = jax.nn.log_sigmoid(f_BSH.astype(acc))
    a_BSH = i_BSH.astype(acc) + reverse_exclusive_cumsum(logf_BSH, axis=1)
    m_BH = lax.stop_gradient(jnp.max(a_BSH, axis=1))
    w_BSH = jnp.exp(a_BSH - m_BH[:, None])
    k = k_BSHK.astype(acc)
    c_BHKW = jnp.einsum("bsh,bshk,bshw->bhkw", w_BSH, k, v_BSHW.astype(acc))
    n_BHK = jnp.einsum("bsh,bshk->bhk", w_BSH, k)
    return c_BHKW, n_BHK, m_BH, jnp.sum(logf_BSH, axis=1)


def state_entering_chunk(c_GBHKW, n_GBHK, m_GBH, f_GBH, axis_name: str):
    """(C, n, m) entering this device's chunk: the recurrence's state after all earlier chunks, from (0, 0, 0)."""
    count = c_GBHKW.shape[0]
    between_GG = chunks_between(count, axis_name).astype(f_GBH.dtype)
    earlier_G = earlier_chunks(count, axis_name)
    log_w_GBH = jnp.where(earlier_G[:, None, None], m_GBH + jnp.einsum("jr,rbh->jbh", between_GG, f_GBH), -jnp.inf)
    log_w_start_BH = jnp.einsum("r,rbh->bh", earlier_G.astype(f_GBH.dtype), f_GBH)  # the zero start, m = 0
    m_in_BH = lax.stop_gradient(jnp.maximum(log_w_start_BH, jnp.max(log_w_GBH, axis=0)))
    w_GBH = jnp.exp(log_w_GBH - m_in_BH)
    c_in = jnp.einsum("gbh,gbhkw->bhkw", w_GBH, c_GBHKW)
    n_in = jnp.einsum("gbh,gbhk->bhk", w_GBH, n_GBHK)
    return c_in, n_in, m_in_BH


def sharded_mlstm(q, k, v, i_preact, f_preact, *, axis_name: str, chunk_size: int = 64, eps: float = 1e-6,
                  impl: str = "auto"):
    """`mlstm(q, k, v, i, f)` of the whole sequence for this device's chunk of it (q, k: [B, L, H, K], v:
    [B, L, H, W], gates [B, L, H]), the sequence split over mesh axis `axis_name`. Call inside a shard_map."""
    gathered = [gather_chunks(x, axis_name) for x in chunk_state(k, v, i_preact, f_preact)]
    start = state_entering_chunk(*gathered, axis_name)
    return mlstm(q, k, v, i_preact, f_preact, initial_state=start, chunk_size=chunk_size, eps=eps, impl=impl)
