"""S2-Attention's block pattern and two pure-jnp forms: dense masked attention (the oracle) and a gather form that
reads only the kept KV blocks (the CPU path; its cost falls with the sparsity).

Layout: q [B, S, H, K], k [B, S, G, K], v [B, S, G, W] (W = K; H = G * R; query head h reads KV head h // R).
Blocked forms: I query blocks, J KV blocks, Y rows of a block.
Tokens form blocks of `block_size`; query block i and KV block j start at the same positions (self-attention).
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np


def default_step(vert_stride: int, num_q_heads: int) -> int:
    """The per-head shift of the vertical residue: max(1, vert_stride // query heads), as the authors' library."""
    return max(1, vert_stride // num_q_heads)


def block_mask(num_heads: int, q_blocks: int, kv_blocks: int, *, local_blocks: int, vert_stride: int | None,
               head_sliding_step: int | None = None, head_offset: int = 0, num_dense_heads: int = 0,
               sink_blocks: int = 0, num_q_heads: int | None = None) -> np.ndarray:
    """bool [heads, q_blocks, kv_blocks]: causal block (i, j) of head h is kept iff j <= i and
    (i - j < local_blocks  or  (j + h * step + head_offset) % vert_stride == 0  or  j < sink_blocks).

    `heads` are KV heads under grouped-query attention (the pattern is shared by a group's query heads) while the
    default step divides by the number of *query* heads (`num_q_heads`, default `num_heads`). The last
    `num_dense_heads` heads are dense (every causal block). `vert_stride=None`: no vertical blocks (a sink +
    window pattern). With fewer query than KV blocks the queries are the last ones (decoding after a prefix):
    query row r is absolute block i = r + kv_blocks - q_blocks."""
    for name, value in (("num_heads", num_heads), ("q_blocks", q_blocks), ("kv_blocks", kv_blocks),
                        ("local_blocks", local_blocks)):
        if value < 1:
            raise ValueError(f"block_mask: {name} must be >= 1, got {value}")
    if vert_stride is not None and vert_stride < 1:
        raise ValueError(f"block_mask: vert_stride must be >= 1 or None, got {vert_stride}")
    if not 0 <= num_dense_heads <= num_heads:
        raise ValueError(f"block_mask: num_dense_heads={num_dense_heads} must be in 0..{num_heads}")
    i = np.arange(q_blocks)[None, :, None] + max(0, kv_blocks - q_blocks)  # queries are the latest blocks
    j = np.arange(kv_blocks)[None, None, :]
    h = np.arange(num_heads)[:, None, None]
    causal = j <= i
    kept = (i - j < local_blocks) | (j < sink_blocks)
    if vert_stride is not None:
        step = default_step(vert_stride, num_q_heads or num_heads) if head_sliding_step is None else head_sliding_step
        kept = kept | ((j + h * step + head_offset) % vert_stride == 0)
    mask = np.broadcast_to(causal & kept, (num_heads, q_blocks, kv_blocks)).copy()
    if num_dense_heads:
        mask[num_heads - num_dense_heads :] = np.broadcast_to(causal[0], mask[num_heads - num_dense_heads :].shape)
    return mask


def uncovered_blocks(mask_GIJ: np.ndarray) -> int:
    """Causal blocks that no head reads."""
    causal = np.tril(np.ones(mask_GIJ.shape[1:], bool))
    return int(np.sum(causal & ~mask_GIJ.any(axis=0)))


def check_coverage(mask_GIJ: np.ndarray, where: str) -> int:
    """Warn when the union over heads leaves causal blocks uncovered (no head can read them); returns the count."""
    missing = uncovered_blocks(mask_GIJ)
    if missing:
        total = int(np.tril(np.ones(mask_GIJ.shape[1:], bool)).sum())
        warnings.warn(f"{where}: {missing} of {total} causal blocks are read by no head; the residues "
                      f"(j + h*step + offset) % vert_stride do not cover every class; use at least vert_stride heads "
                      "(with step 1), a smaller vert_stride, or dense heads", stacklevel=2)
    return missing


def kept_kv_blocks(mask_GIJ: np.ndarray) -> np.ndarray:
    """[G]: KV blocks a head still needs after the last query block (what a pruned decode cache keeps)."""
    return mask_GIJ[:, -1, :].sum(axis=-1)


def expand_to_tokens(mask_GIJ: np.ndarray, seq_len: int, block_size: int) -> np.ndarray:
    """bool [G, S, T]: the block pattern at token level, causal inside the diagonal blocks."""
    tokens = np.kron(mask_GIJ, np.ones((block_size, block_size), bool))[:, :seq_len, :seq_len]
    return tokens & np.tril(np.ones((seq_len, seq_len), bool))


def padded_csr(mask_GIJ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kv_index int32 [G, I, J], kv_count int32 [G, I]): kept KV blocks per (head, query block), ascending, padded
    by repeating the last one; the index's last axis holds the largest count."""
    counts = mask_GIJ.sum(-1).astype(np.int32)
    width = max(1, int(counts.max()))
    index = np.zeros((*mask_GIJ.shape[:2], width), np.int32)
    for h in range(mask_GIJ.shape[0]):
        for i in range(mask_GIJ.shape[1]):
            ids = np.nonzero(mask_GIJ[h, i])[0]
            index[h, i, : len(ids)] = ids
            index[h, i, len(ids) :] = ids[-1] if len(ids) else 0
    return index, counts


def _group(x, groups: int):
    """[B, S, G, K or W] -> [B, S, H, K or W]: each KV head repeated for the R = groups query heads reading it."""
    return jnp.repeat(x, groups, axis=2)


def dense_attention(q, k, v, token_mask_GST=None, scale: float | None = None):
    """(out [B, S, H, W], lse float32 [B, H, S]) of softmax attention restricted to `token_mask` (per KV head;
    None = causal), in float32."""
    b, s, hq, d = q.shape
    groups = hq // k.shape[2]
    scale = d**-0.5 if scale is None else scale
    mask = np.tril(np.ones((1, s, s), bool)) if token_mask_GST is None else token_mask_GST
    mask_HST = jnp.repeat(jnp.asarray(mask), groups, axis=0) if mask.shape[0] > 1 else jnp.asarray(mask)
    logits = jnp.einsum("bshd,bthd->bhst", q.astype(jnp.float32), _group(k, groups).astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale
    logits = jnp.where(mask_HST[None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bhst,bthd->bshd", probs, _group(v, groups).astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype), lse


def gather_attention(q, k, v, mask_GIJ: np.ndarray, block_size: int, scale: float | None = None, first_block=0):
    """The same result, computing only kept blocks: per (KV head, query block), gather its kept KV blocks
    (`padded_csr`), attend over them, mask the padding entries, causal positions and keys past the end.

    `first_block` (an int, or traced): q holds whole query blocks first_block, first_block + 1, ... of the
    sequence that k and v hold (a device's chunk under sequence parallelism; 0: the whole sequence)."""
    b, s, hq, d = q.shape
    t, g = k.shape[1], k.shape[2]
    groups = hq // g
    scale = d**-0.5 if scale is None else scale
    nq, nk = math.ceil(s / block_size), math.ceil(t / block_size)
    index_GIM, count_GI = (jnp.asarray(x) for x in padded_csr(mask_GIJ))  # kept KV blocks of each query block
    index = jax.lax.dynamic_slice_in_dim(index_GIM, first_block, nq, axis=1)  # q's query blocks
    count = jax.lax.dynamic_slice_in_dim(count_GI, first_block, nq, axis=1)
    m = index.shape[-1]

    def blocks(x):  # [B, T, G, K or W] -> [B, G, J, Y, K or W]
        x = jnp.pad(x, ((0, 0), (0, nk * block_size - t), (0, 0), (0, 0)))
        return jnp.moveaxis(x.reshape(b, nk, block_size, x.shape[2], d), 3, 1)

    q_pad = jnp.pad(q, ((0, 0), (0, nq * block_size - s), (0, 0), (0, 0)))
    q_BGRIYK = q_pad.reshape(b, nq, block_size, g, groups, d).transpose(0, 3, 4, 1, 2, 5)
    kb, vb = blocks(k), blocks(v)  # [B, G, J, Y, K]
    take = jax.vmap(lambda x_BJYK, idx_IJ: x_BJYK[:, idx_IJ], in_axes=(1, 0), out_axes=1)  # per KV head
    # the gathered keys of each query block: T = (kept KV blocks) * Y positions
    k_g = take(kb, index).reshape(b, g, nq, m * block_size, d)  # [B, G, I, T, K]
    v_g = take(vb, index).reshape(b, g, nq, m * block_size, d)
    logits = jnp.einsum("bgriqd,bgikd->bgriqk", q_BGRIYK.astype(jnp.float32), k_g.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale
    # validity of each gathered key: entry < count, key position <= query position, key inside the sequence
    key_pos = (index[..., None] * block_size + jnp.arange(block_size)).reshape(g, nq, m * block_size)
    valid_entry = jnp.repeat(jnp.arange(m)[None, None, :] < count[..., None], block_size, axis=-1)  # [G, I, T]
    query_pos = (first_block + jnp.arange(nq))[:, None] * block_size + jnp.arange(block_size)[None, :]  # [I, Y]
    ok = (valid_entry[:, :, None, :] & (key_pos[:, :, None, :] <= query_pos[None, :, :, None])
          & (key_pos[:, :, None, :] < t))  # [G, I, Y, T]
    logits = jnp.where(ok[None, :, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, G, R, I, Y]
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bgriqk,bgikd->bgriqd", probs, v_g.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    out = out.transpose(0, 3, 4, 1, 2, 5).reshape(b, nq * block_size, hq, d)[:, :s]
    lse = lse.reshape(b, hq, nq * block_size)[:, :, :s]
    return out.astype(q.dtype), lse


def merge_partitions(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from each set's (out [B, S, H, W], lse [B, H, S])."""
    lse = jnp.logaddexp(lse_a, lse_b)
    wa = jnp.exp(lse_a - lse).transpose(0, 2, 1)[..., None]
    wb = jnp.exp(lse_b - lse).transpose(0, 2, 1)[..., None]
    out = wa * out_a.astype(jnp.float32) + wb * out_b.astype(jnp.float32)
    return out.astype(out_a.dtype), lse
