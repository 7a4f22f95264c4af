"""S2-Attention and LongGen's sink + window attention as token mixers, with a pruned per-head KV cache.

`s2`: softmax attention (the projections and RoPE of attention.py) where KV head g's query block i reads KV block
j iff j <= i and (i - j < local_blocks or (j + g step + offset) % vert_stride == 0), the last `num_dense_heads` KV
heads dense (pallas_kernels.s2_attention). A subclass with another `pattern` (sink_window.py) reuses the kernels
and the pruned cache below.

Decoding keeps, per KV head, only the blocks that head reads again. The pattern uses absolute block positions, so a
block a head stops reading is never needed later: the cache has `sink + local + ceil(max_blocks / vert_stride)`
block slots per head (sink slots, a ring of `local` slots for the window, one slot per vertical block of the
head's residue), instead of `max_blocks`. With dense heads in the layer every head gets `max_blocks` slots
(one array; no saving). A multi-token call with a cache is a prefill from position 0.

With the sequence split over mesh axis "sequence", a device's chunk of queries attends over all-gathered K and V
under the whole sequence's pattern at global positions (pallas_kernels/s2_attention/sequence_parallel.py).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.errors import ConfigError
from jaxeff.layers.attention import SoftmaxAttention, attention_flops_per_token, head_dims
from jaxeff.layers.registry import TokenMixerSpec, register_token_mixer
from jaxeff.parallel.sharding import per_sequence_shard
from pallas_kernels.s2_attention import block_mask, check_coverage, s2_attention
from pallas_kernels.s2_attention.reference import default_step
from pallas_kernels.s2_attention.sequence_parallel import sharded_s2_attention

if TYPE_CHECKING:
    from jaxeff.config import Config, ModelConfig


Pattern = Callable[["ModelConfig"], dict]  # cfg -> the pattern arguments of `s2_attention`


def s2_pattern(cfg: ModelConfig) -> dict:
    sec = cfg.s2
    return {"local_blocks": sec.local_blocks, "vert_stride": sec.vert_stride, "head_sliding_step": sec.head_sliding_step,
            "head_offset": sec.head_offset, "num_dense_heads": sec.num_dense_heads}


class _Layout:
    """Where each (block, KV head) lives in the pruned cache, and which cached blocks a query block reads."""

    def __init__(self, cfg: ModelConfig, pattern: Pattern, max_len: int | None = None, capacity: int | None = None):
        """From `max_len` (sizing a new cache) or from an existing cache's `capacity`."""
        p, sec = pattern(cfg), cfg.s2
        n_q, n_kv, _ = head_dims(cfg)
        self.bs, self.local = sec.block_size, p["local_blocks"]
        self.sink = p.get("sink_blocks", 0)
        self.stride = p["vert_stride"]
        step = p.get("head_sliding_step")
        self.step = default_step(self.stride, n_q) if self.stride and step is None else (step or 0)
        self.offset = p.get("head_offset", 0)
        self.dense_from = n_kv - p.get("num_dense_heads", 0)  # KV heads >= this read everything
        self.full = self.dense_from < n_kv  # dense heads: one slot per block for every head
        if capacity is None:
            n_blocks = math.ceil(max_len / self.bs)
            vertical_slots = math.ceil(n_blocks / self.stride) if self.stride else 0
            capacity = n_blocks if self.full else self.sink + self.local + vertical_slots
        self.capacity = capacity

    def vertical(self, j, g):
        if not self.stride:
            return jnp.zeros(jnp.broadcast_shapes(jnp.shape(j), jnp.shape(g)), bool)
        return (j + g * self.step + self.offset) % self.stride == 0

    def slot(self, j, g):
        if self.full:
            return j + 0 * g
        ring = self.sink + j % self.local
        vert = self.sink + self.local + (j // self.stride if self.stride else 0)
        return jnp.where(j < self.sink, j, jnp.where(self.vertical(j, g), vert, ring))

    def reads(self, i, j, g):
        """Does KV head g's query block i read block j (j <= i assumed)?"""
        return (i - j < self.local) | (j < self.sink) | self.vertical(j, g) | (g >= self.dense_from)


class S2Attention(SoftmaxAttention):
    pattern = staticmethod(s2_pattern)  # subclasses with another block pattern override it

    def attend(self, q_BSHK, k_BSGK, v_BSGW):
        cfg = self.cfg
        attend = functools.partial(s2_attention, block_size=cfg.s2.block_size, impl=cfg.s2.impl, **self.pattern(cfg))
        # With the sequence split over "sequence": all-gather K and V, the whole sequence's pattern at the chunk's
        # global positions (pallas_kernels/s2_attention/sequence_parallel.py).
        sharded = functools.partial(sharded_s2_attention, block_size=cfg.s2.block_size, **self.pattern(cfg))
        # Per batch (and sequence) shard only: each KV head has its own block pattern (the offsets depend on the
        # head's index), so a shard holding some of the heads would apply the first heads' patterns to them.
        whole_heads = ("batch", "length", None, "head_dim")
        return per_sequence_shard(attend, sharded, (q_BSHK, k_BSGK, v_BSGW), (whole_heads,) * 3, whole_heads)

    def attend_with_cache(self, q_BSHK, k_BSGK, v_BSGW, cache):
        layout = _Layout(self.cfg, self.pattern, capacity=cache["k"].shape[2])
        start, s = cache["index"], q_BSHK.shape[1]
        cache = _write(layout, cache, k_BSGK, v_BSGW, start)
        if s > 1:  # prefill from position 0: the full pattern over the chunk
            return self.attend(q_BSHK, k_BSGK, v_BSGW), cache
        return _decode_step(layout, q_BSHK, cache, start), cache


def _write(layout: _Layout, cache, k_BSGK, v_BSGW, start):
    """Store the chunk's keys/values in their slots; ring entries a later block of the same chunk overwrites are
    skipped (slot index out of range: dropped), so every slot is written at most once per call."""
    b, s, g, d = k_BSGK.shape
    pos_S = start + jnp.arange(s)
    block_S, offset_S = pos_S // layout.bs, pos_S % layout.bs
    heads_G = jnp.arange(g)
    slot_SG = layout.slot(block_S[:, None], heads_G[None, :])
    last_block = (start + s - 1) // layout.bs
    in_ring = ~(layout.vertical(block_S[:, None], heads_G[None, :]) | (block_S[:, None] < layout.sink))
    stale = in_ring & (block_S[:, None] <= last_block - layout.local) & (not layout.full)
    slot_SG = jnp.where(stale, layout.capacity, slot_SG)
    heads_SG = jnp.broadcast_to(heads_G[None, :], (s, g))
    offset_SG = jnp.broadcast_to(offset_S[:, None], (s, g))
    k = cache["k"].at[:, heads_SG, slot_SG, offset_SG].set(k_BSGK.astype(cache["k"].dtype),
                                                           mode="drop")
    v = cache["v"].at[:, heads_SG, slot_SG, offset_SG].set(v_BSGW.astype(cache["v"].dtype), mode="drop")
    blocks = cache["block"].at[heads_SG, slot_SG].set(jnp.broadcast_to(block_S[:, None], (s, g)), mode="drop")
    return {**cache, "k": k, "v": v, "block": blocks, "index": start + s}


def _decode_step(layout: _Layout, q_B1HK, cache, pos):
    """One query token at position `pos` over the cached slots of its heads."""
    b, _, h, d = q_B1HK.shape
    g = cache["k"].shape[1]
    groups = h // g
    i = pos // layout.bs
    block_GJ = cache["block"]
    key_pos_GJY = block_GJ[..., None] * layout.bs + jnp.arange(layout.bs)
    ok_GJY = ((block_GJ >= 0) & (block_GJ <= i) & layout.reads(i, block_GJ, jnp.arange(g)[:, None]))[..., None] & (
        key_pos_GJY <= pos)
    k_BGTK = cache["k"].reshape(b, g, -1, d).astype(jnp.float32)
    v_BGTW = cache["v"].reshape(b, g, -1, d).astype(jnp.float32)
    q_BGRK = q_B1HK[:, 0].reshape(b, g, groups, d).astype(jnp.float32)
    logits = jnp.einsum("bgrk,bgtk->bgrt", q_BGRK, k_BGTK) * d**-0.5
    logits = jnp.where(ok_GJY.reshape(g, -1)[None, :, None], logits, -jnp.inf)
    out = jnp.einsum("bgrt,bgtw->bgrw", jax.nn.softmax(logits, axis=-1), v_BGTW)
    return out.reshape(b, 1, h, d).astype(q_B1HK.dtype)


def init_pruned_cache(pattern: Pattern):
    def init(cfg: ModelConfig, layer: int, batch: int, max_len: int, dtype):
        layout = _Layout(cfg, pattern, max_len)
        _, kv, dh = head_dims(cfg)
        zeros = jnp.zeros((batch, kv, layout.capacity, layout.bs, dh), dtype)
        return {"k": zeros, "v": zeros, "block": jnp.full((kv, layout.capacity), -1, jnp.int32),
                "index": jnp.zeros((), jnp.int32)}

    return init


def s2_flops_per_token(pattern: Pattern):
    """Projections as dense attention; scores and values only over the blocks a head reads (its density)."""
    def flops(cfg: ModelConfig, seq_len: int, layer: int) -> float:
        n_q, n_kv, dh = head_dims(cfg)
        blocks = math.ceil(seq_len / cfg.s2.block_size)
        mask = block_mask(n_kv, blocks, blocks, num_q_heads=n_q, **pattern(cfg))
        density = float(np.mean(mask.sum(-1) / (np.arange(blocks) + 1)))
        dense = attention_flops_per_token(cfg, seq_len, layer)
        projections = 2 * cfg.d_model * dh * (2 * n_q + 2 * n_kv)
        return projections + (dense - projections) * density

    return flops


def check_pallas_block_size(cfg: Config, key: str) -> None:
    sec = cfg.model.s2
    bs = sec.block_size
    if sec.impl == "pallas" and (bs < 16 or bs & (bs - 1)):
        raise ConfigError(f"{key}.impl=pallas needs a block_size that is a power of two >= 16 (one kernel tile "
                          f"per block), got {key}.block_size={bs}; use {key}.impl=auto (xla for this block size)")


def check_s2(cfg: Config, key: str, mesh_shape=None) -> None:
    m, sec = cfg.model, cfg.model.s2
    n_kv = m.n_kv_heads or m.n_heads
    if sec.num_dense_heads > n_kv:
        raise ConfigError(f"{key}.num_dense_heads={sec.num_dense_heads} is more than the {n_kv} KV heads")
    check_pallas_block_size(cfg, key)
    blocks = math.ceil(cfg.data.seq_len / sec.block_size)
    mask = block_mask(n_kv, blocks, blocks, num_q_heads=m.n_heads, **s2_pattern(m))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        check_coverage(mask, f"{key} (s2 layers at data.seq_len={cfg.data.seq_len})")


register_token_mixer(TokenMixerSpec("s2", S2Attention, s2_flops_per_token(s2_pattern), init_pruned_cache(s2_pattern),
                                    cache_kind="pruned", section="s2", check=check_s2))
