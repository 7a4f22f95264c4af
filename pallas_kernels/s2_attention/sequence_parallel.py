"""S2-Attention (and its sink + window pattern) over a sequence split across devices: all-gather K and V.

Inside a `shard_map` where device g holds the contiguous chunk g (length L) of every row:

    k, v   = all_gather(k), all_gather(v)      [B, G L, kv_heads, d]: every key, in order (the only communication)
    mask   = the whole sequence's block pattern, rows g L .. g L + L - 1: per KV head, block indices and the causal
             test taken from GLOBAL positions (a chunk may start mid-block when L is not a multiple of block_size)
    o      = softmax attention of the local queries over all keys under that mask (XLA, masked dense)

What crosses devices grows with the sequence, unlike the linear mixers' fixed-size states: each device receives
(G - 1) x B x L x kv_heads x head_dim x 2 (K and V) x bytes per layer in the forward (the other chunks' keys and
values), and the backward sends as much back (the all-gather's transpose is a reduce-scatter of dK and dV; no
custom rule). A remat'ed layer gathers again in its recomputation.

Work and memory. When L is a multiple of block_size (the usual case) the chunk holds whole query blocks, and each
(KV head, query block) gathers only the KV blocks its pattern keeps from the gathered keys (the block-gather form
of reference.gather_attention, offset to this chunk's first block): work and scores scale with the kept blocks,
as on one device. Otherwise (a chunk starting mid-block) the masked dense form: every device computes the full
[L, G L] score block of its queries (the masked entries too), in float32, B x H x L x G L x 4 bytes. Either way
the work per device does not depend much on its chunk's place (the dense form computes G L keys everywhere; S2's
and sink+window's kept blocks per query block are nearly constant), so contiguous chunks are balanced and no
load-balanced (zigzag) order is used. The Pallas kernels stay the path when the sequence is not split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.sequence_parallel import chunk_index

from .reference import gather_attention

from .ops import _check, pattern


def gather_sequence(x_BLGK, axis_name: str):
    """[B, G L, ...]: every device's chunk, concatenated in chunk order along axis 1."""
    return lax.all_gather(x_BLGK, axis_name, axis=1, tiled=True)


def query_positions(length: int, axis_name: str):
    """[L] int32: the global positions g L + t of this device's queries."""
    return chunk_index(axis_name) * length + jnp.arange(length)


def chunk_token_mask(mask_GIJ, query_pos_L, total: int, block_size: int):
    """bool [kv_heads, L, T]: the token-level pattern of the queries at `query_pos_L` over keys 0..total-1: the
    block mask at (query block, key block) of the global positions, and key position <= query position."""
    key_pos_T = jnp.arange(total)
    rows_GLJ = jnp.take(jnp.asarray(mask_GIJ), query_pos_L // block_size, axis=1)
    blocks_GLT = jnp.take(rows_GLJ, key_pos_T // block_size, axis=2)
    return blocks_GLT & (key_pos_T[None, None, :] <= query_pos_L[None, :, None])


def masked_attention(q_BLHK, k_BTGK, v_BTGW, mask_GLT, scale: float | None = None):
    """Softmax attention of local queries over all keys under a per-KV-head token mask (XLA's dense form; query
    head h reads KV head h // (H / kv_heads))."""
    groups = q_BLHK.shape[2] // k_BTGK.shape[2]
    mask_1HLT = jnp.repeat(mask_GLT, groups, axis=0)[None]
    return jax.nn.dot_product_attention(q_BLHK, k_BTGK, v_BTGW, mask=mask_1HLT, scale=scale, implementation="xla")


def sharded_s2_attention(q, k, v, *, axis_name: str, block_size: int = 64, local_blocks: int,
                         vert_stride: int | None, head_sliding_step: int | None = None, head_offset: int = 0,
                         num_dense_heads: int = 0, sink_blocks: int = 0, scale: float | None = None):
    """`s2_attention(q, k, v, ...)` of the whole sequence, for this device's chunk of it (q [B, L, H, d], k, v
    [B, L, kv_heads, d], the chunk of every row), with the sequence split over mesh axis `axis_name`; the pattern
    is the whole sequence's (`s2_attention`'s arguments). Call inside a shard_map, with every head on the device
    (the pattern depends on the KV head's index). Receives (G - 1) B L kv_heads d x 2 (K and V) elements per
    device in the forward and reduce-scatters as much in the backward (see the module docstring)."""
    k_BTGK, v_BTGW = gather_sequence(k, axis_name), gather_sequence(v, axis_name)
    b, length, h, d = q.shape
    total = k_BTGK.shape[1]
    _check(jax.ShapeDtypeStruct((b, total, h, d), q.dtype), k_BTGK, v_BTGW, block_size, "xla")  # as the whole op
    mask_GIJ = pattern((b, total, h, d), k.shape[2], block_size=block_size, local_blocks=local_blocks,
                       vert_stride=vert_stride, head_sliding_step=head_sliding_step, head_offset=head_offset,
                       num_dense_heads=num_dense_heads, sink_blocks=sink_blocks)
    if length % block_size == 0:  # whole query blocks: only the kept KV blocks
        first_block = chunk_index(axis_name) * (length // block_size)
        return gather_attention(q, k_BTGK, v_BTGW, mask_GIJ, block_size, scale, first_block=first_block)[0]
    mask_GLT = chunk_token_mask(mask_GIJ, query_positions(length, axis_name), total, block_size)
    return masked_attention(q, k_BTGK, v_BTGW, mask_GLT, scale)
