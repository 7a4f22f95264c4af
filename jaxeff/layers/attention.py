"""Softmax attention: causal, rotary positions, grouped-query heads, with a KV cache for decoding; with the sequence
split over mesh axis "sequence", each device's queries attend over all-gathered K and V (`sharded_causal_attention`)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxeff.layers.common import BSHK_AXES, head_dim, output_std, projection
from jaxeff.layers.norms import RMSNorm
from jaxeff.layers.registry import StreamStart, TokenMixerSpec, register_token_mixer
from jaxeff.layers.rope import apply_rope
from jaxeff.parallel.sharding import per_shard, sequence_axis
from pallas_kernels.sequence_parallel import chunk_index

if TYPE_CHECKING:
    from jaxeff.config import ModelConfig


def head_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim)."""
    return cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, head_dim(cfg)


class SoftmaxAttention(nn.Module):
    cfg: ModelConfig
    layer_index: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BSD, positions_BS, cache=None):
        cfg = self.cfg
        h, kv, dh = head_dims(cfg)
        bias = cfg.qkv_bias  # Qwen2
        q_BSHK = projection((h, dh), -1, ("embed", "heads", "head_dim"), cfg.init_std, self.dtype, "q", bias)(x_BSD)
        k_BSGK = projection((kv, dh), -1, ("embed", "kv_heads", "head_dim"), cfg.init_std, self.dtype, "k", bias)(x_BSD)
        v_BSGW = projection((kv, dh), -1, ("embed", "kv_heads", "head_dim"), cfg.init_std, self.dtype, "v", bias)(x_BSD)
        if cfg.qk_norm:  # OpenELM: one learned scale over the head width, shared by the heads
            q_BSHK = RMSNorm(cfg.norm_eps, self.dtype, name="q_norm")(q_BSHK)
            k_BSGK = RMSNorm(cfg.norm_eps, self.dtype, name="k_norm")(k_BSGK)
        q_BSHK = apply_rope(q_BSHK, positions_BS, cfg.rope_theta)
        k_BSGK = apply_rope(k_BSGK, positions_BS, cfg.rope_theta)

        if cache is None:
            out_BSHW, new_cache = self.attend(q_BSHK, k_BSGK, v_BSGW), None
        else:
            out_BSHW, new_cache = self.attend_with_cache(q_BSHK, k_BSGK, v_BSGW, cache)

        out = projection(cfg.d_model, (-2, -1), ("heads", "head_dim", "embed"), output_std(cfg), self.dtype, "o")
        return out(out_BSHW), new_cache


    # Subclasses with another attention pattern (S2, sink + window) override these two.
    def attend(self, q_BSHK, k_BSGK, v_BSGW):
        axis = sequence_axis()
        if axis is None:  # GSPMD partitions batch and heads; cuDNN's kernel on NVIDIA GPUs
            return causal_attention(q_BSHK, k_BSGK, v_BSGW)
        # The sequence split: all-gather K and V (sharded_causal_attention). KV heads split over "tensor" as the
        # query heads are: a device holds contiguous query heads and the KV heads they read (h // (H / G)).
        kv_axes = ("batch", "length", "kv_heads", "head_dim")
        return per_shard(functools.partial(sharded_causal_attention, axis_name=axis), (q_BSHK, k_BSGK, v_BSGW),
                         (BSHK_AXES, kv_axes, kv_axes), BSHK_AXES)

    def attend_with_cache(self, q_BSHK, k_BSGK, v_BSGW, cache):
        return _attend_with_cache(q_BSHK, k_BSGK, v_BSGW, cache)


def causal_attention(q_BSHK, k_BSGK, v_BSGW):
    """Causal softmax attention: cuDNN's fused (flash) kernel on NVIDIA GPUs, XLA's elsewhere.

    XLA's form materialises the [S, S] scores per head (`jaxeff plan` showed 20 GiB of temporaries per 2 x 8192
    tokens x 16 heads on an H100, against 0.1 GiB for cuDNN's). The choice is made when lowering, so compiling
    for a GPU from a CPU host picks cuDNN too; shapes cuDNN does not take (float32, head dims above 128 or not a
    multiple of 8) use XLA's everywhere."""
    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    d = q_BSHK.shape[-1]
    if q_BSHK.dtype not in (jnp.bfloat16, jnp.float16) or d > 128 or d % 8:
        return xla(q_BSHK, k_BSGK, v_BSGW)

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    return jax.lax.platform_dependent(q_BSHK, k_BSGK, v_BSGW, cuda=cudnn, default=xla)


def sharded_causal_attention(q_BLHK, k_BLGK, v_BLGW, *, axis_name: str):
    """`causal_attention` of the whole sequence for this device's chunk g of it (q [B, L, H, K], k, v [B, L, G, K]),
    the sequence split into contiguous chunks over mesh axis `axis_name`. Call inside a shard_map.

    All-gathers K and V (tiled along the sequence) and attends with the local queries, at global positions g L + t,
    over keys 0..G L - 1 under the causal mask (XLA's masked form). Each device receives (G - 1) x B x L x kv_heads
    x head_dim x 2 (K and V) x bytes per layer, growing with the sequence (the linear mixers exchange fixed-size
    states); the backward returns as much (the gather's transpose is a reduce-scatter of dK and dV). Every device
    computes the full [L, G L] score block (masked entries too; float32, B H L G L x 4 bytes): the same work on
    every chunk, so contiguous chunks are balanced already and no load-balanced (zigzag) order is used; that
    would pay with a kernel that skips masked blocks."""
    k_BTGK = jax.lax.all_gather(k_BLGK, axis_name, axis=1, tiled=True)
    v_BTGW = jax.lax.all_gather(v_BLGW, axis_name, axis=1, tiled=True)
    length, total = q_BLHK.shape[1], k_BTGK.shape[1]
    query_pos_L = chunk_index(axis_name) * length + jnp.arange(length)
    mask_11LT = (jnp.arange(total)[None, :] <= query_pos_L[:, None])[None, None]
    return jax.nn.dot_product_attention(q_BLHK, k_BTGK, v_BTGW, mask=mask_11LT, implementation="xla")


def _attend_with_cache(q_BSHK, k_BSGK, v_BSGW, cache):
    """Write this chunk's keys/values at cache["index"], then attend over everything written so far."""
    start = cache["index"]
    k_BTGK = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_BSGK.astype(cache["k"].dtype), start, axis=1)
    v_BTGW = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_BSGW.astype(cache["v"].dtype), start, axis=1)
    s, t = q_BSHK.shape[1], k_BTGK.shape[1]
    query_pos_S = start + jnp.arange(s)
    mask_11ST = (jnp.arange(t)[None, :] <= query_pos_S[:, None])[None, None]
    out = jax.nn.dot_product_attention(q_BSHK, k_BTGK.astype(q_BSHK.dtype), v_BTGW.astype(q_BSHK.dtype),
                                       mask=mask_11ST)
    return out, {"k": k_BTGK, "v": v_BTGW, "index": start + s}


def init_kv_cache(cfg: ModelConfig, layer: int, batch: int, max_len: int, dtype):
    _, kv, dh = head_dims(cfg)
    zeros = jnp.zeros((batch, max_len, kv, dh), dtype)
    return {"k": zeros, "v": zeros, "index": jnp.zeros((), jnp.int32)}


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, layer: int) -> float:
    """Projections plus QK^T and AV; causal, so a token attends to (seq_len + 1) / 2 keys on average."""
    h, kv, dh = head_dims(cfg)
    projections = 2 * cfg.d_model * dh * (2 * h + 2 * kv)
    scores_and_values = 2 * 2 * h * dh * (seq_len + 1) / 2
    return projections + scores_and_values


def prefix_params(cfg: ModelConfig, layer: int, prefix_tokens: int):
    """ParScale: a stream's learned prefix, `prefix_tokens` keys and values per KV head ([G, T, K], as released)."""
    _, kv, dh = head_dims(cfg)
    axes = ("kv_heads", None, "head_dim")
    return {"prefix_k": ((kv, prefix_tokens, dh), axes), "prefix_v": ((kv, prefix_tokens, dh), axes)}


def cache_after_prefix(cfg: ModelConfig, layer: int, start, max_len: int, dtype):
    """A KV cache whose first T positions hold the prefix (keys used as they are: no RoPE), written up to T. The
    real tokens keep positions 0, 1, ... for RoPE; the cache index only places them after the prefix, where every
    one of them sees all T prefix tokens."""
    def after_prefix(prefix_NGTK):
        n, g, t, k = prefix_NGTK.shape
        return jnp.concatenate([prefix_NGTK.transpose(0, 2, 1, 3).astype(dtype), jnp.zeros((n, max_len, g, k), dtype)],
                               axis=1)

    t = start["prefix_k"].shape[2]
    return {"k": after_prefix(start["prefix_k"]), "v": after_prefix(start["prefix_v"]),
            "index": jnp.asarray(t, jnp.int32)}


def prefix_flops_per_token(cfg: ModelConfig, layer: int, prefix_tokens: int) -> float:
    h, _, dh = head_dims(cfg)
    return 2 * 2 * h * dh * prefix_tokens  # scores and values over the T prefix keys


register_token_mixer(TokenMixerSpec("attention", SoftmaxAttention, attention_flops_per_token, init_kv_cache,
                                    cache_kind="kv",
                                    stream_start=StreamStart(prefix_params, cache_after_prefix, prefix_flops_per_token)))
