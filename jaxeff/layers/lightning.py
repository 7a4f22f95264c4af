"""TransNormerLLM's token mixer: gated linear attention computed with lightning attention.

Token mixer, per layer l of L, heads H of width d:

    q, k = silu(x Wq), silu(x Wk);  v, u = x Wv, x Wu             (no activation on v and u)
    q, k = LRPE-d(q, pos), LRPE-d(k, pos)                          (only on `model.lightning.lrpe_layers`)
    a    = lightning_attention(q, k, v, rate_l)                   (per-head decay exp(-rate), no 1/sqrt(d))
    y    = (SRMSNorm(concat_heads(a)) * u) Wo                      (norm over the whole hidden width)

Decoding carries the [batch, heads, d_k, d_v] float32 state per layer: constant memory in the
sequence length. LRPE uses the absolute positions the model passes in, so prefill and step
decoding see the same phases.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.errors import ConfigError
from jaxeff.layers.common import BSHK_AXES, head_dim, output_std, projection
from jaxeff.layers.registry import StreamStart, TokenMixerSpec, recurrent_call, register_token_mixer
from jaxeff.parallel.sharding import per_sequence_shard, per_shard
from pallas_kernels.lightning_attention import lightning_attention, lightning_attention_step
from pallas_kernels.lightning_attention.sequence_parallel import sharded_lightning_attention

if TYPE_CHECKING:
    from jaxeff.config import Config, ModelConfig


def alibi_slopes(n_heads: int) -> np.ndarray:
    """ALiBi's geometric slopes 2^(-8(h+1)/H); for H not a power of two, ALiBi's interleaving rule."""
    def power_of_two(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return np.asarray(power_of_two(n_heads), np.float64)
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = alibi_slopes(2 * closest)[0::2][: n_heads - closest]
    return np.concatenate([power_of_two(closest), extra])


def decay_rates(n_heads: int, n_layers: int, layer: int, convention: str = "code") -> np.ndarray:
    """Per-head decay rates of one layer; the per-step decay is exp(-rate). Fixed, not learned.

    "code" (default, what released TransNormerLLM checkpoints use):
        rate[h] = alibi_slope[h] * (1 - layer / (n_layers - 1) + 1e-5)
    "paper" (TransNormerLLM eq. 10, lambda = exp(-(8h/H)(1 - l/L))), with h counted from 1 so that
    every head decays:
        rate[h] = 8 (h + 1) / H * (1 - layer / n_layers)
    """
    if convention == "code":
        temperature = 1.0 - (layer / (n_layers - 1) if n_layers > 1 else 0.0) + 1e-5
        return alibi_slopes(n_heads) * temperature
    if convention == "paper":
        return 8.0 * np.arange(1, n_heads + 1) / n_heads * (1.0 - layer / n_layers)
    raise ValueError(f"unknown decay convention {convention!r}; expected 'code' or 'paper'")


def lrpe(x_BSHK, positions_BS, theta_HK):
    """LRPE-d: [x cos(theta * pos), x sin(theta * pos)] on the last axis (doubles the head width).

    <lrpe(q)_t, lrpe(k)_s> = sum_j q_j k_j cos(theta_j (t - s)): a relative phase per channel.
    """
    angle_BSHK = positions_BS[:, :, None, None].astype(jnp.float32) * theta_HK
    x = x_BSHK.astype(jnp.float32)
    return jnp.concatenate([x * jnp.cos(angle_BSHK), x * jnp.sin(angle_BSHK)], axis=-1).astype(x_BSHK.dtype)


def lrpe_theta_init(key, shape, dtype=jnp.float32):
    """theta_j = 10000^(-2j / (H d)) over the flattened (head, channel) index j: each head a slice."""
    h, d = shape
    return (10000.0 ** (-2.0 * jnp.arange(h * d, dtype=jnp.float32) / (h * d))).reshape(h, d).astype(dtype)


def _uses_lrpe(cfg: ModelConfig, layer: int) -> bool:
    return layer in cfg.lightning.lrpe_layers


class LightningMixer(nn.Module):
    cfg: ModelConfig
    layer_index: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BSD, positions_BS, cache=None):
        cfg, layer = self.cfg, self.layer_index
        h, d = cfg.n_heads, head_dim(cfg)
        axes = ("embed", "heads", "head_dim")
        q_BSHK = nn.silu(projection((h, d), -1, axes, cfg.init_std, self.dtype, "q")(x_BSD))
        k_BSHK = nn.silu(projection((h, d), -1, axes, cfg.init_std, self.dtype, "k")(x_BSD))
        v_BSHW = projection((h, d), -1, axes, cfg.init_std, self.dtype, "v")(x_BSD)
        u_BSHW = projection((h, d), -1, axes, cfg.init_std, self.dtype, "u")(x_BSD)
        if _uses_lrpe(cfg, layer):
            theta_HK = self.param("lrpe_theta", nn.with_logical_partitioning(lrpe_theta_init, ("heads", "head_dim")),
                                  (h, d), jnp.float32)
            q_BSHK, k_BSHK = lrpe(q_BSHK, positions_BS, theta_HK), lrpe(k_BSHK, positions_BS, theta_HK)
        rate_H = jnp.asarray(decay_rates(h, cfg.n_layers, layer, cfg.lightning.decay_convention), jnp.float32)

        block, impl = cfg.lightning.block_size, cfg.lightning.impl
        a_BSHW, new_cache = recurrent_call(
            cache, x_BSD.shape[1],
            full=lambda: per_sequence_shard(functools.partial(lightning_attention, block_size=block, impl=impl),
                                            functools.partial(sharded_lightning_attention, block_size=block, impl=impl),
                                            (q_BSHK, k_BSHK, v_BSHW, rate_H), (*[BSHK_AXES] * 3, ("heads",)),
                                            BSHK_AXES),
            step=lambda state: lightning_attention_step(q_BSHK[:, 0], k_BSHK[:, 0], v_BSHW[:, 0], rate_H, state),
            prefill=lambda state: per_shard(functools.partial(_continue_from, block_size=block, impl=impl),
                                            (q_BSHK, k_BSHK, v_BSHW, rate_H, state),
                                            (*[BSHK_AXES] * 3, ("heads",), STATE_AXES), (BSHK_AXES, STATE_AXES)))

        a_BSHW = a_BSHW.astype(jnp.float32)
        # NormAttention: normalise over the whole hidden width (all heads), then gate with u.
        a_BSHW = a_BSHW * jax.lax.rsqrt(jnp.mean(a_BSHW * a_BSHW, axis=(-2, -1), keepdims=True) + cfg.norm_eps)
        gated_BSHW = (a_BSHW * u_BSHW.astype(jnp.float32)).astype(self.dtype)
        out = projection(cfg.d_model, (-2, -1), ("heads", "head_dim", "embed"), output_std(cfg), self.dtype, "o")
        return out(gated_BSHW), new_cache



STATE_AXES = ("batch", "heads", None, None)  # the recurrent state [B, H, d_k, d_v]


def _continue_from(q_BSHK, k_BSHK, v_BSHW, rate_H, state_BHKW, *, block_size, impl):
    """The parallel form from a state (a prefill, or ParScale's learned start), returning the final state."""
    return lightning_attention(q_BSHK, k_BSHK, v_BSHW, rate_H, initial_state=state_BHKW, return_final_state=True,
                               block_size=block_size, impl=impl)


def init_lightning_cache(cfg: ModelConfig, layer: int, batch: int, max_len: int, dtype):
    """A zero state; `max_len` does not matter: memory is constant in the sequence length."""
    d = head_dim(cfg)
    d_k = 2 * d if _uses_lrpe(cfg, layer) else d
    return {"state": jnp.zeros((batch, cfg.n_heads, d_k, d), jnp.float32)}


def lightning_flops_per_token(cfg: ModelConfig, seq_len: int, layer: int) -> float:
    """Projections (q, k, v, u, o) plus the block algorithm: the quadratic part inside a block
    (a token attends to (B + 1) / 2 earlier block rows on average, for q k^T and for (.)v) and the
    state product q KV plus the state update k^T v, each d_k x d_v per head."""
    h, d = cfg.n_heads, head_dim(cfg)
    d_k = 2 * d if _uses_lrpe(cfg, layer) else d
    block = min(cfg.lightning.block_size, seq_len)
    projections = 2 * cfg.d_model * h * d * 5
    intra = 2 * h * (d_k + d) * (block + 1) / 2
    inter_and_state = 2 * 2 * h * d_k * d
    return projections + intra + inter_and_state


def check_lightning(cfg: Config, key: str, mesh_shape=None) -> None:
    sec, n_layers, seq_len = cfg.model.lightning, cfg.model.n_layers, cfg.data.seq_len
    outside = [i for i in sec.lrpe_layers if i >= n_layers]
    if outside:
        raise ConfigError(f"{key}.lrpe_layers={sec.lrpe_layers}: layers {outside} are outside "
                          f"0..{n_layers - 1} (model.n_layers={n_layers})")
    if sec.block_size > seq_len:
        raise ConfigError(f"{key}.block_size={sec.block_size} is longer than data.seq_len={seq_len}: the whole "
                          f"sequence would be one quadratic block; set {key}.block_size to at most {seq_len}")


def learned_state_params(cfg: ModelConfig, layer: int, prefix_tokens: int):
    """ParScale: a stream's learned initial state [H, d_k, d_v] (what the prefix of attention becomes here:
    the state a prefix would have left; `prefix_tokens` does not apply)."""
    d = head_dim(cfg)
    d_k = 2 * d if _uses_lrpe(cfg, layer) else d
    return {"state": ((cfg.n_heads, d_k, d), ("heads", None, None))}


def cache_from_learned_state(cfg: ModelConfig, layer: int, start, max_len: int, dtype):
    return {"state": start["state"].astype(jnp.float32)}


register_token_mixer(TokenMixerSpec("lightning", LightningMixer, lightning_flops_per_token, init_lightning_cache,
                                    cache_kind="state", section="lightning", check=check_lightning,
                                    stream_start=StreamStart(learned_state_params, cache_from_learned_state)))
