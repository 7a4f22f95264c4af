"""xLSTM 7B's mLSTM layer as a token mixer (`model.mixer_pattern: [mlstm]`, settings in `model.mlstm`).

    q, k = x Wq, x Wk                    [B,S,H,d_qk]   (d_qk = d_model * qk_dim_factor / H)
    v, o = x Wv, x Wo                    [B,S,H,d_v]    (d_v  = d_model * v_dim_factor / H)
    i, f = softcap(x Wi + bi), softcap(x Wf + bf)       [B,S,H], soft cap 15, float32
    h    = mlstm(q, k, v, i, f)          the cell (pallas_kernels.mlstm); recurrent state in decoding
    y    = (sigmoid(o) * LayerNorm_per_head(h)) Wout

The block around it is the model's: x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). Initialisation as
xLSTM 7B: q/k/v "small" N(0, sqrt(2 / (5 d_model))), output projection "wang" N(0, 2 / (n_layers sqrt(d_model))),
gate and output-gate weights zero, input-gate bias `igate_bias_init` (-10), forget-gate biases
linspace(`fgate_bias_init`) over the heads (3 to 6).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxeff.errors import ConfigError
from jaxeff.layers.common import BSH_AXES, BSHK_AXES, projection
from jaxeff.layers.registry import StreamStart, TokenMixerSpec, recurrent_call, register_token_mixer
from jaxeff.parallel.sharding import per_sequence_shard, per_shard
from pallas_kernels.mlstm import mlstm, mlstm_step
from pallas_kernels.mlstm.sequence_parallel import sharded_mlstm

if TYPE_CHECKING:
    from jaxeff.config import Config, ModelConfig


def soft_cap(x, cap: float | None):
    """cap * tanh(x / cap): smooth, |result| < cap, slope 1 at 0."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def small_init_std(cfg: ModelConfig) -> float:
    return (2.0 / (5.0 * cfg.d_model)) ** 0.5


def wang_init_std(cfg: ModelConfig) -> float:
    return 2.0 / (cfg.n_layers * cfg.d_model**0.5)


def _fgate_bias_init(cfg: ModelConfig):
    lo, hi = cfg.mlstm.fgate_bias_init

    def init(key, shape, dtype=jnp.float32):
        return jnp.linspace(lo, hi, shape[0], dtype=dtype)

    return nn.with_logical_partitioning(init, ("heads",))


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm over each head's d_v (mean removed, float32 reductions), a learned scale, no bias."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h_BSHW):
        _, _, heads, dv = h_BSHW.shape
        scale_HW = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("heads", "head_dim")),
                              (heads, dv), jnp.float32)
        x = h_BSHW.astype(jnp.float32)
        x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)
        return (x * scale_HW).astype(self.dtype)


class MlstmMixer(nn.Module):
    cfg: ModelConfig
    layer_index: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BSD, positions_BS, cache=None):
        cfg, sec = self.cfg, self.cfg.mlstm
        h = cfg.n_heads
        dk, dv = sec.head_dims(cfg.d_model, h)
        small = small_init_std(cfg)
        q_BSHK = projection((h, dk), -1, ("embed", "heads", "head_dim"), small, self.dtype, "q")(x_BSD)
        k_BSHK = projection((h, dk), -1, ("embed", "heads", "head_dim"), small, self.dtype, "k")(x_BSD)
        v_BSHW = projection((h, dv), -1, ("embed", "heads", "head_dim"), small, self.dtype, "v")(x_BSD)
        zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "heads", "head_dim"))
        o_BSHW = nn.DenseGeneral((h, dv), use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                                 kernel_init=zeros, name="ogate")(x_BSD)
        # Gates in float32: exponential input gates are sensitive to rounding.
        gate_kernel = nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "heads"))
        i_bias = nn.with_logical_partitioning(nn.initializers.constant(sec.igate_bias_init), ("heads",))
        i_BSH = nn.Dense(h, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=gate_kernel, bias_init=i_bias,
                         name="igate")(x_BSD.astype(jnp.float32))
        f_BSH = nn.Dense(h, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=gate_kernel,
                         bias_init=_fgate_bias_init(cfg), name="fgate")(x_BSD.astype(jnp.float32))
        i_BSH, f_BSH = soft_cap(i_BSH, sec.gate_soft_cap), soft_cap(f_BSH, sec.gate_soft_cap)

        cell = dict(eps=sec.cell_eps)
        chunk, impl = sec.chunk_size, sec.impl
        h_BSHW, new_cache = recurrent_call(
            cache, x_BSD.shape[1],
            full=lambda: per_sequence_shard(functools.partial(mlstm, chunk_size=chunk, impl=impl, **cell),
                                            functools.partial(sharded_mlstm, chunk_size=chunk, impl=impl, **cell),
                                            (q_BSHK, k_BSHK, v_BSHW, i_BSH, f_BSH),
                                            (*[BSHK_AXES] * 3, *[BSH_AXES] * 2), BSHK_AXES),
            step=lambda state: mlstm_step(q_BSHK[:, 0], k_BSHK[:, 0], v_BSHW[:, 0], i_BSH[:, 0], f_BSH[:, 0], state,
                                          **cell),
            prefill=lambda state: per_shard(functools.partial(_continue_from, chunk_size=chunk, impl=impl, **cell),
                                            (q_BSHK, k_BSHK, v_BSHW, i_BSH, f_BSH, state),
                                            (*[BSHK_AXES] * 3, *[BSH_AXES] * 2, STATE_AXES),
                                            (BSHK_AXES, STATE_AXES)))

        h_BSHW = MultiHeadLayerNorm(sec.norm_eps, self.dtype, name="norm")(h_BSHW.astype(self.dtype))
        gated_BSHW = jax.nn.sigmoid(o_BSHW.astype(jnp.float32)).astype(self.dtype) * h_BSHW
        out = projection(cfg.d_model, (-2, -1), ("heads", "head_dim", "embed"), wang_init_std(cfg), self.dtype, "out")
        return out(gated_BSHW), new_cache



STATE_AXES = (("batch", "heads", None, None), ("batch", "heads", None), ("batch", "heads"))  # C, n, m


def _continue_from(q_BSHK, k_BSHK, v_BSHW, i_BSH, f_BSH, state, **kwargs):
    """The chunkwise form from a state (a prefill, or ParScale's learned start), returning the final state."""
    return mlstm(q_BSHK, k_BSHK, v_BSHW, i_BSH, f_BSH, initial_state=state, return_final_state=True, **kwargs)


def init_mlstm_cache(cfg: ModelConfig, layer: int, batch: int, max_len: int, dtype):
    """A zero state (C, n, m) in float32: memory is constant in the sequence length."""
    dk, dv = cfg.mlstm.head_dims(cfg.d_model, cfg.n_heads)
    h = cfg.n_heads
    return {"state": (jnp.zeros((batch, h, dk, dv), jnp.float32), jnp.zeros((batch, h, dk), jnp.float32),
                      jnp.zeros((batch, h), jnp.float32))}


def mlstm_flops_per_token(cfg: ModelConfig, seq_len: int, layer: int) -> float:
    """Projections (q, k, v, output gate, gates, output) plus the chunkwise cell: inside a chunk a token meets
    (L + 1) / 2 earlier rows (q k^T and the weighted sum of v), across chunks q C and the state update k^T v."""
    h = cfg.n_heads
    dk, dv = cfg.mlstm.head_dims(cfg.d_model, h)
    chunk = min(cfg.mlstm.chunk_size, seq_len)
    projections = 2 * cfg.d_model * h * (2 * dk + 2 * dv) + 2 * cfg.d_model * 2 * h + 2 * h * dv * cfg.d_model
    intra = 2 * h * (dk + dv) * (chunk + 1) / 2
    inter_and_state = 2 * 2 * h * dk * dv
    return projections + intra + inter_and_state


def check_mlstm(cfg: Config, key: str, mesh_shape=None) -> None:
    m, sec = cfg.model, cfg.model.mlstm
    for name, factor in (("qk_dim_factor", sec.qk_dim_factor), ("v_dim_factor", sec.v_dim_factor)):
        width = m.d_model * factor
        if width != int(width) or int(width) % m.n_heads:
            raise ConfigError(f"{key}.{name}={factor}: model.d_model * {name} = {width:g} must be a whole "
                              f"multiple of model.n_heads={m.n_heads}; change {key}.{name} or model.n_heads")
    if sec.chunk_size > cfg.data.seq_len:
        raise ConfigError(f"{key}.chunk_size={sec.chunk_size} is longer than data.seq_len={cfg.data.seq_len}: "
                          f"the whole sequence would be one quadratic chunk; set {key}.chunk_size to at most "
                          f"{cfg.data.seq_len}")


def learned_state_params(cfg: ModelConfig, layer: int, prefix_tokens: int):
    """ParScale: a stream's learned initial memory C [H, d_qk, d_v] and normaliser n [H, d_qk]; the stabiliser m
    starts at 0, so C and n are on their true scale (the cell's backward gives no gradient to m)."""
    dk, dv = cfg.mlstm.head_dims(cfg.d_model, cfg.n_heads)
    return {"C": ((cfg.n_heads, dk, dv), ("heads", None, None)), "n": ((cfg.n_heads, dk), ("heads", None))}


def cache_from_learned_state(cfg: ModelConfig, layer: int, start, max_len: int, dtype):
    c_NHKW, n_NHK = start["C"].astype(jnp.float32), start["n"].astype(jnp.float32)
    return {"state": (c_NHKW, n_NHK, jnp.zeros(n_NHK.shape[:2], jnp.float32))}


register_token_mixer(TokenMixerSpec("mlstm", MlstmMixer, mlstm_flops_per_token, init_mlstm_cache, cache_kind="state",
                                    section="mlstm", check=check_mlstm,
                                    stream_start=StreamStart(learned_state_params, cache_from_learned_state)))
