"""Lightning attention over a sequence split across devices (LASP-2's form): one all-gather of [B, H, K, W] states.

Inside a `shard_map` where device g holds the contiguous chunk g (length L) of every row:

    kv_g   = sum_s lam^(L-1-s) k_s^T v_s                       this chunk's state, from a zero start (one matmul)
    all    = all_gather(kv)                                     [G, B, H, K, W]: the only communication
    start  = sum_{j<g} lam^(L (g-1-j)) kv_j                     the state entering chunk g
    o      = lightning_attention(q, k, v, rate, initial_state=start)   the kernel, on the local chunk

What crosses devices does not depend on the sequence length. The backward is autodiff's: the kernel's custom VJP
gives the gradient of `start`, the weighted sum and the all-gather transpose to a reduce-scatter (the reverse
prefix of state gradients), and the matmul gives k and v theirs.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.sequence_parallel import chunk_index, earlier_chunks, gather_chunks

from . import reference as _ref
from .ops import lightning_attention


def chunk_state(k_BSHK, v_BSHW, rate_H):
    """The state after this chunk from a zero start: sum_s exp(-rate (L-1-s)) k_s^T v_s, float32 (float64)."""
    acc = _ref.acc_dtype(jnp.result_type(k_BSHK, v_BSHW))
    length = k_BSHK.shape[1]
    to_end_SH = jnp.exp(-rate_H.astype(acc)[None, :] * jnp.arange(length - 1, -1, -1, dtype=acc)[:, None])
    return jnp.einsum("bshk,sh,bshw->bhkw", k_BSHK.astype(acc), to_end_SH, v_BSHW.astype(acc))


def state_entering_chunk(kv_GBHKW, rate_H, length: int, axis_name: str):
    """sum_{j<g} exp(-rate L (g-1-j)) kv_j for this device's chunk g (zeros for the first chunk)."""
    count = kv_GBHKW.shape[0]
    hops_G = jnp.maximum(chunk_index(axis_name) - 1 - jnp.arange(count), 0).astype(kv_GBHKW.dtype)
    weight_GH = jnp.where(earlier_chunks(count, axis_name)[:, None],
                          jnp.exp(-rate_H.astype(kv_GBHKW.dtype)[None, :] * length * hops_G[:, None]), 0.0)
    return jnp.einsum("gh,gbhkw->bhkw", weight_GH, kv_GBHKW)


def sharded_lightning_attention(q, k, v, rate, *, axis_name: str, block_size: int = 64, impl: str = "auto"):
    """`lightning_attention(q, k, v, rate)` of the whole sequence, for this device's chunk of it (q, k: [B, L, H, K],
    v: [B, L, H, W], the chunk of every row), with the sequence split over mesh axis `axis_name`. Call inside a
    shard_map. rate is not differentiated, as in lightning_attention."""
    rate = lax.stop_gradient(jnp.asarray(rate))
    kv_GBHKW = gather_chunks(chunk_state(k, v, rate), axis_name)
    start = state_entering_chunk(kv_GBHKW, rate, q.shape[1], axis_name)
    return lightning_attention(q, k, v, rate, initial_state=start, block_size=block_size, impl=impl)
