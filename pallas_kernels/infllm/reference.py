"""InfLLM v2's block selection and two pure-jnp attention forms over it: dense attention under the token mask (the
oracle) and a query-block-chunked masked form (the CPU path; memory O(S x block) instead of O(S^2)).

Layout: q [B, S, H, K], k [B, S, G, K], v [B, S, G, W] (H = G * R; query head h reads KV head h // R).
C pooled keys ("semantic kernels"), J KV blocks, I query blocks, Y rows of a block.

Selection for the query at position t and KV head g (docs/models/infllm.md):
  kernel c = mean of keys [c*stride, c*stride + kernel_size); visible to t iff its last key <= t
  p_h(t, c) = softmax over visible c of scale * q_h(t) . kernel_g(c), 0 for the others; score_g(t, c) = sum_h p_h
  block score(t, j) = max over kernels c overlapping block j ([c*stride, c*stride+kernel_size) meets
                      [j*block, (j+1)*block))
  kept(t, j) = j <= t // block  and  (j < init_blocks  or  t//block - j < local_blocks  or  j is among the
               `topk - init_blocks` best-scoring other causal blocks, ties to the lower index)
The selection is a function of q and k that is not differentiated (stop_gradient): indices, as in the paper.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def num_kernels(seq_len: int, kernel_size: int, kernel_stride: int) -> int:
    """Whole windows that fit in `seq_len` keys (0 when the sequence is shorter than one window)."""
    return 0 if seq_len < kernel_size else (seq_len - kernel_size) // kernel_stride + 1


def kernel_block_overlap(n_kernels: int, n_blocks: int, kernel_size: int, kernel_stride: int,
                         block_size: int) -> np.ndarray:
    """bool [C, J]: kernel c's token window meets block j's."""
    c = np.arange(n_kernels)[:, None] * kernel_stride
    j = np.arange(n_blocks)[None, :] * block_size
    return (c < j + block_size) & (c + kernel_size > j)


def pooled_keys(k_BSGK, kernel_size: int, kernel_stride: int):
    """[B, C, G, K] float32: the mean of each window of keys."""
    s = k_BSGK.shape[1]
    c = num_kernels(s, kernel_size, kernel_stride)
    rows_CY = np.arange(c)[:, None] * kernel_stride + np.arange(kernel_size)[None, :]
    # a gather and a plain mean (not prefix sums): a window's value must not depend on the keys after it, so a
    # decode step over a longer cache pools exactly what the full forward pooled
    return jnp.mean(k_BSGK.astype(jnp.float32)[:, rows_CY], axis=2)


def block_scores(q_BSHK, k_BSGK, *, kernel_size: int, kernel_stride: int, block_size: int, scale: float,
                 positions_S=None):
    """float32 [B, G, S, J]: each query's relevance score of every KV block (before the init / local / causal rules).

    `positions_S`: absolute positions of the queries (default 0..S-1; decoding passes the cache index) while the
    keys are always positions 0..T-1."""
    b, s, h, d = q_BSHK.shape
    t, g = k_BSGK.shape[1], k_BSGK.shape[2]
    pos_S = jnp.arange(s) if positions_S is None else positions_S
    n_blocks = -(-t // block_size)
    kern_BCGK = pooled_keys(k_BSGK, kernel_size, kernel_stride)
    c = kern_BCGK.shape[1]
    if c == 0:
        return jnp.zeros((b, g, s, n_blocks), jnp.float32)
    q_BGRSK = jnp.transpose(q_BSHK.astype(jnp.float32).reshape(b, s, g, h // g, d), (0, 2, 3, 1, 4))
    logits = jnp.einsum("bgrsk,bcgk->bgrsc", q_BGRSK, kern_BCGK, precision="highest") * scale
    visible_SC = (jnp.arange(c)[None, :] * kernel_stride + kernel_size - 1) <= pos_S[:, None]
    logits = jnp.where(visible_SC, logits, -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0))
    p = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)  # a query that sees no kernel: all 0
    score_BGSC = jnp.sum(p, axis=2)  # per-head softmax, summed over the group's query heads
    overlap_CJ = jnp.asarray(kernel_block_overlap(c, n_blocks, kernel_size, kernel_stride, block_size))
    return jnp.max(jnp.where(overlap_CJ, score_BGSC[..., None], -jnp.inf), axis=-2)  # [B, G, S, J]


def select_blocks(score_BGSJ, *, block_size: int, init_blocks: int, local_blocks: int, topk: int,
                  positions_S=None, dense_len: int = 0):
    """bool [B, G, S, J]: the KV blocks each query attends (init + local + top-k of the rest, all causal). A query
    at position t with t + 1 < dense_len (a context shorter than dense_len) reads every causal block."""
    s, n_blocks = score_BGSJ.shape[2], score_BGSJ.shape[3]
    pos_S = jnp.arange(s) if positions_S is None else positions_S
    i_S1 = (pos_S // block_size)[:, None]
    j_1J = jnp.arange(n_blocks)[None, :]
    causal = j_1J <= i_S1
    short_S1 = (pos_S + 1 < dense_len)[:, None]
    fixed = causal & ((j_1J < init_blocks) | (i_S1 - j_1J < local_blocks) | short_S1)
    k = min(max(topk - init_blocks, 0), n_blocks)
    if k == 0:
        return jnp.broadcast_to(fixed, score_BGSJ.shape)
    candidates = jnp.where(causal & ~fixed, score_BGSJ, -jnp.inf)
    vals, idx = jax.lax.top_k(candidates, k)  # equal scores: the lower index first
    chosen = jnp.any((idx[..., None] == jnp.arange(n_blocks)) & jnp.isfinite(vals)[..., None], axis=-2)
    return chosen | fixed


def infllm_mask(q_BSHK, k_BSGK, *, kernel_size: int, kernel_stride: int, block_size: int, init_blocks: int,
                local_blocks: int, topk: int, scale: float, positions_S=None, dense_len: int = 0):
    """The selection (bool [B, G, S, J]) from q and k, outside the gradient."""
    q_BSHK, k_BSGK = jax.lax.stop_gradient(q_BSHK), jax.lax.stop_gradient(k_BSGK)
    score = block_scores(q_BSHK, k_BSGK, kernel_size=kernel_size, kernel_stride=kernel_stride,
                         block_size=block_size, scale=scale, positions_S=positions_S)
    return select_blocks(score, block_size=block_size, init_blocks=init_blocks, local_blocks=local_blocks,
                         topk=topk, positions_S=positions_S, dense_len=dense_len)


def token_mask(mask_BGSJ, block_size: int, kv_len: int, positions_S=None):
    """bool [B, G, S, T]: key position u is read by query t iff its block is kept and u <= t."""
    s = mask_BGSJ.shape[2]
    pos_S = jnp.arange(s) if positions_S is None else positions_S
    u_T = jnp.arange(kv_len)
    return mask_BGSJ[..., u_T // block_size] & (u_T[None, :] <= pos_S[:, None])


def dense_attention(q_BSHK, k_BSGK, v_BSGW, mask_BGST, scale: float):
    """Softmax attention in float32 with a per-(batch, KV head) token mask; a row with no key gives 0."""
    b, s, h, d = q_BSHK.shape
    g = k_BSGK.shape[2]
    q = q_BSHK.astype(jnp.float32).reshape(b, s, g, h // g, d)
    logits = jnp.einsum("bsgrk,btgk->bgrst", q, k_BSGK.astype(jnp.float32), precision="highest") * scale
    logits = jnp.where(mask_BGST[:, :, None], logits, -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0))
    p = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)
    out = jnp.einsum("bgrst,btgw->bsgrw", p, v_BSGW.astype(jnp.float32), precision="highest")
    return out.reshape(b, s, h, -1).astype(q_BSHK.dtype)


def chunked_attention(q_BSHK, k_BSGK, v_BSGW, mask_BGSJ, block_size: int, scale: float):
    """`dense_attention` under the block selection, one query block at a time (lax.map): the same result with
    [B, H, block, S] scores live instead of [B, H, S, S]."""
    b, s, h, d = q_BSHK.shape
    n_q = -(-s // block_size)
    pad = n_q * block_size - s
    q_IBYHK = jnp.moveaxis(jnp.pad(q_BSHK, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n_q, block_size, h, d), 1, 0)
    m = jnp.pad(mask_BGSJ, ((0, 0), (0, 0), (0, pad), (0, 0)))
    m_IBGYJ = jnp.moveaxis(m.reshape(b, m.shape[1], n_q, block_size, -1), 2, 0)

    def one(args):
        i, q_BYHK, m_BGYJ = args
        pos_Y = i * block_size + jnp.arange(block_size)
        tok = token_mask(m_BGYJ, block_size, s, pos_Y)
        return dense_attention(q_BYHK, k_BSGK, v_BSGW, tok, scale)

    out = jax.lax.map(one, (jnp.arange(n_q), q_IBYHK, m_IBGYJ))  # [I, B, Y, H, W]
    return jnp.moveaxis(out, 0, 1).reshape(b, n_q * block_size, h, -1)[:, :s]


def union_per_query_block(mask_BGSJ, block_size: int):
    """bool [B, G, I, J]: KV blocks read by any query of query block i (what a block-sparse kernel visits)."""
    b, g, s, j = mask_BGSJ.shape
    n_q = -(-s // block_size)
    m = jnp.pad(mask_BGSJ, ((0, 0), (0, 0), (0, n_q * block_size - s), (0, 0)))
    return jnp.any(m.reshape(b, g, n_q, block_size, j), axis=3)


def kept_fraction(mask_BGSJ, block_size: int) -> jax.Array:
    """Mean over queries of (keys read) / (causal keys)."""
    s = mask_BGSJ.shape[2]
    tok = token_mask(mask_BGSJ, block_size, s)
    causal = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
    return jnp.mean(jnp.sum(tok, -1) / jnp.sum(causal, -1))


def n_blocks(seq_len: int, block_size: int) -> int:
    return math.ceil(seq_len / block_size)
