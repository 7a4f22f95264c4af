"""Pure-jnp forms of decayed causal linear attention (TransNormerLLM / Lightning Attention-2).

Per head h with per-step decay lam = exp(-rate[h]) (no 1/sqrt(d) scaling, no normaliser):

    kv_t = lam * kv_{t-1} + k_t^T v_t        (kv_{-1} = initial state, K x W)
    o_t  = q_t kv_t

Three equivalent forms live here:

* `quadratic_attention`: O = ((Q K^T) * M) V + (Lambda Q) S0 with M_ts = lam^(t-s) for t >= s. O(n^2); the oracle.
* `chunked_attention_fwd` / `chunked_attention_bwd`: Lightning Attention-2 (intra-block quadratic product plus an
  inter-block recurrent state) with `lax.scan` over blocks, and its hand-written backward (forward sweep for dq,
  reverse sweep for dk/dv/dS0). Memory O(block^2 + d_k d_v) per head, not O(n^2).
* `recurrent_step`: one decoding step.

Layout is the op's: q/k [B, S, H, K], v [B, S, H, W], state [B, H, K, W]. Blocked forms add Z (blocks) and Y
(rows of a block): [Z, B, H, Y, K]. Arithmetic is done in the "accumulation
dtype" `acc_dtype(x.dtype)` = float32 for 16/32-bit inputs (float64 for float64 inputs), with HIGHEST matmul
precision so that TPU/GPU do not silently drop to bf16/tf32 passes.

Padding rule used by the chunked form: the sequence is zero-padded to whole blocks, and block t has
`m_t = min(block, n - t*block)` valid rows. The state update of a block uses lam^(m_t) and per-row weights
lam^(m_t-1-j) (zero for padded rows j >= m_t), so padded steps never decay the state: outputs and the final
state are exactly those of the unpadded sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST


def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation/state dtype: float32, or float64 when the inputs are float64."""
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def _rate_bh(rate_H: jax.Array, dt) -> jax.Array:
    return rate_H.astype(dt)[None, :, None, None]  # [1, H, 1, 1]


# --------------------------------------------------------------------------------------------------------------
# Quadratic reference
# --------------------------------------------------------------------------------------------------------------


def quadratic_attention(q_BSHK, k_BSHK, v_BSHW, rate_H, initial_state_BHKW=None):
    """O(n^2) masked form. Returns (o_BSHW in q's dtype, final_state_BHKW in the accumulation dtype)."""
    dt = acc_dtype(q_BSHK.dtype)
    q, k, v = (x.astype(dt) for x in (q_BSHK, k_BSHK, v_BSHW))
    n = q.shape[1]
    rate = _rate_bh(rate_H, dt)  # [1, H, 1, 1]
    t = jnp.arange(n, dtype=dt)
    diff = t[:, None] - t[None, :]  # [S, T] = t - s
    # max(diff, 0) keeps exp() <= 1 in the masked-out upper triangle (no inf * 0).
    mask_HST = jnp.where(diff >= 0, jnp.exp(-rate * jnp.maximum(diff, 0)), 0)[0]
    scores_BHST = jnp.einsum("bthk,bshk->bhts", q, k, precision=_HI) * mask_HST
    o = jnp.einsum("bhts,bshv->bthv", scores_BHST, v, precision=_HI)
    # Final state: sum_s lam^(n-1-s) k_s^T v_s (+ lam^n S0).
    w_HT = jnp.exp(-rate[0, :, :, 0] * (n - 1 - t)[None, :])  # [H, T]: weight of key position s in the state
    state = jnp.einsum("hs,bshk,bshv->bhkv", w_HT, k, v, precision=_HI)
    if initial_state_BHKW is not None:
        s0 = initial_state_BHKW.astype(dt)
        # Row t sees S0 decayed t+1 times.
        qdec_HS = jnp.exp(-rate[0, :, :, 0] * (t + 1)[None, :])
        o = o + jnp.einsum("hs,bshk,bhkv->bshv", qdec_HS, q, s0, precision=_HI)
        state = state + jnp.exp(-rate * n) * s0
    return o.astype(q_BSHK.dtype), state


# --------------------------------------------------------------------------------------------------------------
# Block constants shared by the chunked form (the Pallas kernels compute the same quantities in-kernel)
# --------------------------------------------------------------------------------------------------------------


def block_decays(rate, blk: int, m, dt):
    """Decay factors of one block with `m` valid rows (m may be traced).

    rate: broadcastable [..., 1, 1]. Returns
      mask [..., blk, blk]: lam^(i-j) for i >= j else 0            (intra-block causal decay)
      q_decay [..., blk, 1]: lam^(i+1)                              (row i reads the carried state)
      k_decay [..., blk, 1]: lam^(m-1-j) for j < m else 0          (row j's weight at the block's last valid row)
      block_decay [..., 1, 1]: lam^m                               (carried state across the block)
    """
    i = jnp.arange(blk)
    diff = i[:, None] - i[None, :]
    mask = jnp.where(diff >= 0, jnp.exp(-rate * jnp.maximum(diff, 0).astype(dt)), 0)
    q_decay = jnp.exp(-rate * (i[:, None] + 1).astype(dt))
    kd = (m - 1 - i[:, None]).astype(dt)
    # Padded rows (kd < 0) get weight 0; clamping first keeps exp() finite.
    k_decay = jnp.where(kd >= 0, jnp.exp(-rate * jnp.maximum(kd, 0)), 0)
    block_decay = jnp.exp(-rate * jnp.asarray(m, dt))
    return mask, q_decay, k_decay, block_decay


def _to_blocks(x, blk: int, dt):
    """[B, S, H, K or W] -> [Z, B, H, Y, K or W] (Y = blk) zero-padded to whole blocks, in dtype dt."""
    b, s, h, d = x.shape
    nb = -(-s // blk)
    x = jnp.pad(x.astype(dt), ((0, 0), (0, nb * blk - s), (0, 0), (0, 0)))
    return x.reshape(b, nb, blk, h, d).transpose(1, 0, 3, 2, 4)


def _from_blocks(x, n: int):
    """[Z, B, H, Y, K or W] -> [B, S, H, K or W] (S = n)."""
    nb, b, h, blk, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, nb * blk, h, d)[:, :n]


def _valid_rows(n: int, blk: int):
    nb = -(-n // blk)
    return jnp.minimum(n - jnp.arange(nb) * blk, blk)  # [Z]


# --------------------------------------------------------------------------------------------------------------
# Chunked (Lightning Attention-2) forward / backward in jnp
# --------------------------------------------------------------------------------------------------------------


def chunked_attention_fwd(q_BSHK, k_BSHK, v_BSHW, rate_H, initial_state_BHKW, block_size: int):
    """Lightning Attention-2 forward. initial_state_BHKW must be given (zeros for none).

    Returns (o_BSHW in q's dtype, final_state_BHKW in the accumulation dtype).
    """
    dt = acc_dtype(q_BSHK.dtype)
    n = q_BSHK.shape[1]
    blk = int(block_size)
    rate = _rate_bh(rate_H, dt)  # [1, H, 1, 1]
    xs = (_to_blocks(q_BSHK, blk, dt), _to_blocks(k_BSHK, blk, dt), _to_blocks(v_BSHW, blk, dt), _valid_rows(n, blk))

    def step(kv, x):
        q, k, v, m = x  # q/k: [B, H, Y, K], v: [B, H, Y, W]
        mask, q_dec, k_dec, blk_dec = block_decays(rate, blk, m, dt)
        s = jnp.einsum("bhik,bhjk->bhij", q, k, precision=_HI) * mask
        o = jnp.einsum("bhij,bhjv->bhiv", s, v, precision=_HI)  # intra-block (left product)
        o = o + jnp.einsum("bhik,bhkv->bhiv", q * q_dec, kv, precision=_HI)  # inter-block (right product)
        kv = blk_dec * kv + jnp.einsum("bhjk,bhjv->bhkv", k * k_dec, v, precision=_HI)
        return kv, o

    kv, o_ZBHYW = lax.scan(step, initial_state_BHKW.astype(dt), xs)
    return _from_blocks(o_ZBHYW, n).astype(q_BSHK.dtype), kv


def chunked_attention_bwd(q_BSHK, k_BSHK, v_BSHW, rate_H, initial_state_BHKW, do_BSHW, dstate_BHKW, block_size: int):
    """Exact gradients of chunked_attention_fwd given cotangents of (o, final_state).

    Returns (dq, dk, dv in the input dtypes, d_initial_state in the accumulation dtype).
    Pass 1 (forward order) carries the prefix state KV for dq; pass 2 (reverse order) carries the suffix state
    dKV = sum_{r after block} lam^(r - block_end) q_r^T do_r (+ lam^(n-1-block_end) dS) for dk, dv. What is left
    of dKV after the reverse sweep is the gradient of the initial state.
    """
    dt = acc_dtype(q_BSHK.dtype)
    n = q_BSHK.shape[1]
    blk = int(block_size)
    rate = _rate_bh(rate_H, dt)
    q_ZBHYK, k_ZBHYK, v_ZBHYW, do_ZBHYW = (_to_blocks(x, blk, dt) for x in (q_BSHK, k_BSHK, v_BSHW, do_BSHW))
    m_Z = _valid_rows(n, blk)

    def fwd_step(kv, x):
        q, k, v, do, m = x
        mask, q_dec, k_dec, blk_dec = block_decays(rate, blk, m, dt)
        dp = jnp.einsum("bhiv,bhjv->bhij", do, v, precision=_HI) * mask
        dq = jnp.einsum("bhij,bhjk->bhik", dp, k, precision=_HI)
        dq = dq + jnp.einsum("bhiv,bhkv->bhik", do * q_dec, kv, precision=_HI)
        kv = blk_dec * kv + jnp.einsum("bhjk,bhjv->bhkv", k * k_dec, v, precision=_HI)
        return kv, dq

    _, dq_ZBHYK = lax.scan(fwd_step, initial_state_BHKW.astype(dt), (q_ZBHYK, k_ZBHYK, v_ZBHYW, do_ZBHYW, m_Z))

    def rev_step(dkv, x):
        q, k, v, do, m = x
        mask, q_dec, k_dec, blk_dec = block_decays(rate, blk, m, dt)
        dp = jnp.einsum("bhiv,bhjv->bhij", do, v, precision=_HI) * mask
        s = jnp.einsum("bhik,bhjk->bhij", q, k, precision=_HI) * mask
        dk = jnp.einsum("bhij,bhik->bhjk", dp, q, precision=_HI)
        dk = dk + jnp.einsum("bhjv,bhkv->bhjk", v * k_dec, dkv, precision=_HI)
        dv = jnp.einsum("bhij,bhiv->bhjv", s, do, precision=_HI)
        dv = dv + jnp.einsum("bhjk,bhkv->bhjv", k * k_dec, dkv, precision=_HI)
        dkv = blk_dec * dkv + jnp.einsum("bhik,bhiv->bhkv", q * q_dec, do, precision=_HI)
        return dkv, (dk, dv)

    ds0, (dk_ZBHYK, dv_ZBHYW) = lax.scan(rev_step, dstate_BHKW.astype(dt), (q_ZBHYK, k_ZBHYK, v_ZBHYW, do_ZBHYW, m_Z),
                                        reverse=True)
    return (
        _from_blocks(dq_ZBHYK, n).astype(q_BSHK.dtype),
        _from_blocks(dk_ZBHYK, n).astype(k_BSHK.dtype),
        _from_blocks(dv_ZBHYW, n).astype(v_BSHW.dtype),
        ds0,
    )


# --------------------------------------------------------------------------------------------------------------
# Recurrent decoding step
# --------------------------------------------------------------------------------------------------------------


def recurrent_step(q_BHK, k_BHK, v_BHW, rate_H, state_BHKW):
    """One token: new_state = lam * state + k^T v; o = q new_state. Returns (o_BHW in q's dtype, new_state).

    The decay stays inside the recurrence (no lam^t / lam^-t factorisation), so it is stable for any length.
    """
    dt = acc_dtype(q_BHK.dtype)
    lam = jnp.exp(-rate_H.astype(dt))[None, :, None, None]
    new_state = lam * state_BHKW.astype(dt) + k_BHK.astype(dt)[..., :, None] * v_BHW.astype(dt)[..., None, :]
    o = jnp.einsum("bhk,bhkv->bhv", q_BHK.astype(dt), new_state, precision=_HI)
    return o.astype(q_BHK.dtype), new_state
