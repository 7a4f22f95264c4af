"""mLSTM cell (xLSTM) in plain jnp: the exact quadratic oracle, the chunkwise form and the recurrent step.

Layout inside this module: heads before sequence, q_BHSK, k_BHSK, v_BHSW, gate pre-activations i_BHS, f_BHS.
All arithmetic in `acc` = float32 (float64 for float64 inputs). The stabilised state is (C_BHKW, n_BHK, m_BH):
the true state times exp(-m), m being the running max of the log gate weights.

Per head, with q scaled by d_qk**-0.5, log f_t = logsigmoid(f_t), input gate exp(i_t):
    m_t = max(log f_t + m_{t-1}, i_t)
    C_t = exp(log f_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T      (n_t likewise with k_t)
    h_t = q_t C_t / (max(|q_t . n_t|, exp(-m_t)) + eps)
Unrolled over the sequence (b_t = sum_{r<=t} log f_r), m_t = max(b_t + m_0, max_{s<=t} b_t - b_s + i_s): the
initial state acts as an extra column with log weight b_t + m_0. The quadratic form keeps that column, so it equals
the recurrence exactly, also for very negative input gates (where the plain parallel form of the paper differs
slightly through the exp(-m) floor).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_PAD_INPUT_GATE = -1e30  # exp(-1e30 - m) == 0: a padded step adds nothing (and log f = 0 keeps the state)


def acc_dtype(*xs) -> jnp.dtype:
    return jnp.float64 if any(jnp.asarray(x).dtype == jnp.float64 for x in xs) else jnp.float32


def zero_state(b: int, h: int, dk: int, dv: int, dtype=jnp.float32):
    return jnp.zeros((b, h, dk, dv), dtype), jnp.zeros((b, h, dk), dtype), jnp.zeros((b, h), dtype)


def _normalise(num, den, m, eps: float):
    """num [..., W] / normaliser; den and m have num's leading axes ([B,H,S] or, chunked, [B,H,Z,Y])."""
    return num / (jnp.maximum(jnp.abs(den), jnp.exp(-m)) + eps)[..., None]


def quadratic(q, k, v, i, f, state, eps: float):
    """Exact O(S^2) oracle. q, k: [B,H,S,K]; v: [B,H,S,W]; i, f: [B,H,S]; state (C0, n0, m0).

    Returns (h [B,H,S,W], final state). The forget-gate sums b_t - b_s are formed as cumulative sums of the
    masked log f matrix (no difference of two long cumsums, so no cancellation).
    """
    acc = acc_dtype(q, k, v, i, f)
    q, k, v, i, f = (x.astype(acc) for x in (q, k, v, i, f))
    c0, n0, m0 = (x.astype(acc) for x in state)
    s = q.shape[2]
    logf = jax.nn.log_sigmoid(f)
    later = jnp.tril(jnp.ones((s, s), bool), -1)  # r > s
    # logF_ts = sum_{s < r <= t} log f_r  (0 on the diagonal; only t >= s is used)
    logF = jnp.cumsum(jnp.where(later, logf[..., :, None], 0.0), axis=-2)
    causal = jnp.tril(jnp.ones((s, s), bool))
    logD = jnp.where(causal, logF + i[..., None, :], -jnp.inf)
    b = jnp.cumsum(logf, axis=-1)
    log_w0 = b + m0[..., None]  # the initial-state column
    m = jnp.maximum(jnp.max(logD, axis=-1), log_w0)
    D = jnp.exp(logD - m[..., None])
    w0 = jnp.exp(log_w0 - m)
    qs = q * q.shape[-1] ** -0.5
    scores = jnp.einsum("bhtk,bhsk->bhts", qs, k) * D
    num = jnp.einsum("bhts,bhsv->bhtv", scores, v) + w0[..., None] * jnp.einsum("bhtk,bhkv->bhtv", qs, c0)
    den = scores.sum(-1) + w0 * jnp.einsum("bhtk,bhk->bht", qs, n0)
    h = _normalise(num, den, m, eps)
    # Final state: the same weights seen from the last step.
    a_last = logF[..., -1, :] + i  # log weight of step s in the state after step S
    m_last = jnp.maximum(jnp.max(a_last, axis=-1), log_w0[..., -1])
    w_s = jnp.exp(a_last - m_last[..., None])
    w0_last = jnp.exp(log_w0[..., -1] - m_last)
    c_last = w0_last[..., None, None] * c0 + jnp.einsum("bhs,bhsk,bhsv->bhkv", w_s, k, v)
    n_last = w0_last[..., None] * n0 + jnp.einsum("bhs,bhsk->bhk", w_s, k)
    return h, (c_last, n_last, m_last)


def pad_to_chunks(q, k, v, i, logf, chunk: int):
    """Pad the sequence axis (2) to a multiple of `chunk` with steps that change nothing."""
    s = q.shape[2]
    pad = -s % chunk
    if not pad:
        return q, k, v, i, logf
    widths = ((0, 0), (0, 0), (0, pad))
    return (jnp.pad(q, widths + ((0, 0),)), jnp.pad(k, widths + ((0, 0),)), jnp.pad(v, widths + ((0, 0),)),
            jnp.pad(i, widths, constant_values=_PAD_INPUT_GATE), jnp.pad(logf, widths))


def chunk_states(k_BHZYK, v_BHZYW, i_BHZY, logf_BHZY, state):
    """Sequential part: the state at the start of every chunk, and the final state.

    Inputs are split into Z chunks of Y steps. Returns ((C [B,H,Z,K,W], n [B,H,Z,K], m [B,H,Z]), final state).
    """
    b = jnp.cumsum(logf_BHZY, axis=-1)
    g = b[..., -1]  # log decay over the whole chunk
    a = g[..., None] - b + i_BHZY  # log weight of each row at the chunk end

    def step(carry, xs):
        c, n, m = carry
        k, v, a, g = xs  # [B,H,Y,K], [B,H,Y,W], [B,H,Y], [B,H]
        m_next = jnp.maximum(g + m, jnp.max(a, axis=-1))
        decay = jnp.exp(g + m - m_next)
        w = jnp.exp(a - m_next[..., None])
        c_next = decay[..., None, None] * c + jnp.einsum("bhl,bhlk,bhlv->bhkv", w, k, v)
        n_next = decay[..., None] * n + jnp.einsum("bhl,bhlk->bhk", w, k)
        return (c_next, n_next, m_next), (c, n, m)

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (k_BHZYK, v_BHZYW, a, g))
    final, starts = jax.lax.scan(step, state, xs)
    return tuple(jnp.moveaxis(x, 0, 2) for x in starts), final


def chunk_outputs(q_BHZYK, k_BHZYK, v_BHZYW, i_BHZY, logf_BHZY, starts, eps: float):
    """Parallel part: every chunk's outputs from its start state and its own rows (all chunks at once)."""
    c, n, m = starts
    y = q_BHZYK.shape[-2]
    b = jnp.cumsum(logf_BHZY, axis=-1)
    causal = jnp.tril(jnp.ones((y, y), bool))
    logD = jnp.where(causal, b[..., :, None] - b[..., None, :] + i_BHZY[..., None, :], -jnp.inf)
    m_inter = b + m[..., None]
    m_row = jnp.maximum(m_inter, jnp.max(logD, axis=-1))
    qs = q_BHZYK * q_BHZYK.shape[-1] ** -0.5
    scores = jnp.einsum("bhntk,bhnsk->bhnts", qs, k_BHZYK) * jnp.exp(logD - m_row[..., None])
    q_inter = qs * jnp.exp(m_inter - m_row)[..., None]
    num = jnp.einsum("bhnts,bhnsv->bhntv", scores, v_BHZYW) + jnp.einsum("bhntk,bhnkv->bhntv", q_inter, c)
    den = scores.sum(-1) + jnp.einsum("bhntk,bhnk->bhnt", q_inter, n)
    return _normalise(num, den, m_row, eps)


def chunked(q, k, v, i, f, state, chunk: int, eps: float):
    """Chunkwise form: `lax.scan` over chunk states, then all chunk outputs in parallel. Any length S.

    Same arguments and results as `quadratic`; differentiable by JAX autodiff.
    """
    acc = acc_dtype(q, k, v, i, f)
    q, k, v, i, f = (x.astype(acc) for x in (q, k, v, i, f))
    state = tuple(x.astype(acc) for x in state)
    bsz, h, s, dk = q.shape
    dv = v.shape[-1]
    q, k, v, i, logf = pad_to_chunks(q, k, v, i, jax.nn.log_sigmoid(f), chunk)
    nc = q.shape[2] // chunk
    split = lambda x: x.reshape(bsz, h, nc, chunk, *x.shape[3:])  # noqa: E731
    q, k, v, i, logf = (split(x) for x in (q, k, v, i, logf))
    starts, final = chunk_states(k, v, i, logf, state)
    out = chunk_outputs(q, k, v, i, logf, starts, eps)
    return out.reshape(bsz, h, nc * chunk, dv)[:, :, :s], final


def step(q, k, v, i, f, state, eps: float):
    """One recurrent step. q, k: [B,H,K]; v: [B,H,W]; i, f: [B,H]; state (C, n, m). Returns (h [B,H,W], state)."""
    acc = acc_dtype(q, k, v, i, f)
    q, k, v, i, f = (x.astype(acc) for x in (q, k, v, i, f))
    c, n, m = (x.astype(acc) for x in state)
    logf = jax.nn.log_sigmoid(f)
    m_new = jnp.maximum(logf + m, i)
    decay, gain = jnp.exp(logf + m - m_new), jnp.exp(i - m_new)
    c = decay[..., None, None] * c + gain[..., None, None] * k[..., :, None] * v[..., None, :]
    n = decay[..., None] * n + gain[..., None] * k
    qs = q * q.shape[-1] ** -0.5
    num = jnp.einsum("bhk,bhkv->bhv", qs, c)
    den = jnp.einsum("bhk,bhk->bh", qs, n)
    h = num / (jnp.maximum(jnp.abs(den), jnp.exp(-m_new)) + eps)[..., None]
    return h, (c, n, m_new)
