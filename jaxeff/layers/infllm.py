"""InfLLM v2 (MiniCPM4) as a token mixer: softmax attention (attention.py's projections and RoPE, no parameters of
its own) where each query reads only the KV blocks it selects from mean-pooled keys (pallas_kernels.infllm).

Dense below `dense_len`: a query whose context (position + 1) is shorter than `model.infllm.dense_len` reads every
causal block, so a sequence shorter than that is plain causal attention (attention.py's fast path), and decoding
step by step selects exactly as the full forward does.

Decoding keeps the whole KV cache (attention.py's): each new query scores the pooled cached keys, chooses its
blocks and attends those (one query at a time, float32, as the reference). A multi-token call with a cache is a
prefill from position 0.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jaxeff.errors import ConfigError
from jaxeff.layers.attention import (SoftmaxAttention, attention_flops_per_token, causal_attention, head_dims,
                                     init_kv_cache)
from jaxeff.layers.registry import TokenMixerSpec, register_token_mixer
from pallas_kernels.infllm import infllm_attention
from pallas_kernels.infllm import reference as ref

if TYPE_CHECKING:
    from jaxeff.config import Config, ModelConfig


def settings(cfg: ModelConfig) -> dict:
    sec = cfg.infllm
    return {"block_size": sec.block_size, "kernel_size": sec.kernel_size, "kernel_stride": sec.kernel_stride,
            "init_blocks": sec.init_blocks, "local_blocks": sec.local_blocks, "topk": sec.topk,
            "dense_len": sec.dense_len}


class InfllmAttention(SoftmaxAttention):
    def attend(self, q_BSHK, k_BSGK, v_BSGW):
        sec = self.cfg.infllm
        if q_BSHK.shape[1] < sec.dense_len:  # every query's context is short: dense
            return causal_attention(q_BSHK, k_BSGK, v_BSGW)
        return infllm_attention(q_BSHK, k_BSGK, v_BSGW, impl=sec.impl, **settings(self.cfg))

    def attend_with_cache(self, q_BSHK, k_BSGK, v_BSGW, cache):
        start, s = cache["index"], q_BSHK.shape[1]
        k_BTGK = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_BSGK.astype(cache["k"].dtype), start, axis=1)
        v_BTGW = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_BSGW.astype(cache["v"].dtype), start, axis=1)
        new_cache = {"k": k_BTGK, "v": v_BTGW, "index": start + s}
        if s > 1:  # prefill from position 0: the training path over the chunk
            return self.attend(q_BSHK, k_BSGK, v_BSGW), new_cache
        return _decode_step(self.cfg, q_BSHK, k_BTGK, v_BTGW, start), new_cache


def _decode_step(cfg: ModelConfig, q_B1HK, k_BTGK, v_BTGW, pos):
    """The query at position `pos` over the cache (keys after `pos` are never visible: the pooled keys that reach
    past it and the blocks after its own are excluded by the selection's causal rules)."""
    p = settings(cfg)
    scale = q_B1HK.shape[-1] ** -0.5
    pos_S = jnp.reshape(pos, (1,))
    k = k_BTGK.astype(jnp.float32)
    mask_BG1J = ref.infllm_mask(q_B1HK.astype(jnp.float32), k, scale=scale, positions_S=pos_S, **p)
    tokens_BG1T = ref.token_mask(mask_BG1J, p["block_size"], k.shape[1], pos_S)
    return ref.dense_attention(q_B1HK, k, v_BTGW.astype(jnp.float32), tokens_BG1T, scale)


def kept_blocks(cfg: ModelConfig, seq_len: int) -> float:
    """Mean KV blocks a query reads (init + local + top-k, at most its causal blocks) over a sequence's queries."""
    sec = cfg.infllm
    blocks = math.ceil(seq_len / sec.block_size)
    total = 0
    for i in range(blocks):
        rows = min(sec.block_size, seq_len - i * sec.block_size)
        dense = (i + 1) * sec.block_size <= sec.dense_len
        chosen = sec.local_blocks + max(sec.topk - sec.init_blocks, 0) + sec.init_blocks
        total += rows * (i + 1 if dense else min(i + 1, chosen))
    return total / seq_len


def infllm_flops_per_token(cfg: ModelConfig, seq_len: int, layer: int) -> float:
    """Projections as dense attention; scores and values over the kept blocks; plus the selection's pooled-key
    scores (2 d per query head and visible pooled key)."""
    n_q, n_kv, dh = head_dims(cfg)
    sec = cfg.infllm
    dense = attention_flops_per_token(cfg, seq_len, layer)
    if seq_len < sec.dense_len:
        return dense
    projections = 2 * cfg.d_model * dh * (2 * n_q + 2 * n_kv)
    density = min(1.0, kept_blocks(cfg, seq_len) * sec.block_size / ((seq_len + 1) / 2))
    pooled = ref.num_kernels(seq_len, sec.kernel_size, sec.kernel_stride) / 2  # visible on average
    return projections + (dense - projections) * density + 2 * n_q * dh * pooled


def check_infllm(cfg: Config, key: str, mesh_shape=None) -> None:
    sec = cfg.model.infllm
    bs = sec.block_size
    if sec.impl == "pallas" and (bs < 16 or bs & (bs - 1)):
        raise ConfigError(f"{key}.impl=pallas needs a block_size that is a power of two >= 16 (one kernel tile per "
                          f"block), got {key}.block_size={bs}; use {key}.impl=auto (xla for this block size)")
    if sec.kernel_stride > sec.kernel_size:
        raise ConfigError(f"{key}.kernel_stride={sec.kernel_stride} is larger than {key}.kernel_size="
                          f"{sec.kernel_size}: keys between the windows would never be pooled; lower the stride")
    if mesh_shape and mesh_shape.get("sequence", 1) > 1:
        raise ConfigError(f"{key}: the infllm mixer does not split the sequence yet; set mesh.sequence=1")


register_token_mixer(TokenMixerSpec("infllm", InfllmAttention, infllm_flops_per_token, init_kv_cache,
                                    cache_kind="kv", section="infllm", check=check_infllm))
