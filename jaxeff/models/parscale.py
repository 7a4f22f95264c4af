"""ParScale's parallel streams (Chen et al. 2025): P copies of every input through one shared decoder.

Stream p differs from the others only by where each token mixer starts (`StreamStart` in the mixer's spec):
attention layers start from a learned prefix of keys and values, recurrent mixers from a learned state. After the
final norm, `StreamAggregate` weighs the P hidden states of each token into one.

Streams fold into the batch axis batch-major: row b P + p is stream p of example b (letter N = B P in shape
names). A device holding whole examples holds all their streams, so the repeat and the aggregation need no
communication, and the mesh splits streams like batch rows when the batch alone is too small to split.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxeff.layers.common import normal_init
from jaxeff.layers.registry import token_mixer_for_layer


def is_parscale_param(name: str) -> bool:
    """Whether a parameter ('layer_0/stream_start/prefix_k') exists only because of ParScale."""
    return name.startswith("parscale_aggregate/") or "/stream_start/" in name


def repeat_streams(x_B, streams: int):
    """[B, ...] -> [B P, ...]: every example once per stream, batch-major."""
    return jnp.repeat(x_B, streams, axis=0)


def stream_rows(start: dict[str, Any], batch: int) -> dict[str, Any]:
    """Each learned start [P, ...] -> [B P, ...] in the same batch-major order."""
    return {name: jnp.tile(x_P, (batch,) + (1,) * (x_P.ndim - 1)) for name, x_P in start.items()}


class LearnedStreamStart(nn.Module):
    """One layer's learned start for every stream: each parameter [P, *shape] (names and shapes from the mixer)."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]
    streams: int
    init_std: float

    @nn.compact
    def __call__(self) -> dict[str, Any]:
        return {name: self.param(name, normal_init(self.init_std, (None, *axes)), (self.streams, *shape), jnp.float32)
                for name, (shape, axes) in self.shapes.items()}


def learned_start_cache(cfg, layer: int, rows: int, max_len: int, dtype):
    """Inside a block: the cache its mixer starts from, for `rows` = B P rows and `max_len` tokens after the start.
    Creates the layer's `stream_start` parameters."""
    spec = token_mixer_for_layer(cfg, layer).stream_start
    sec = cfg.parscale
    start = LearnedStreamStart(spec.params(cfg, layer, sec.prefix_tokens), sec.streams, cfg.init_std,
                               name="stream_start")()
    return spec.cache(cfg, layer, stream_rows(start, rows // sec.streams), max_len, dtype)


def start_caches(cfg, params: dict[str, Any], batch: int, max_len: int, dtype) -> list:
    """Decoding: every layer's cache for `batch` examples x P streams, holding the learned starts (from `params`)."""
    caches = []
    for i in range(cfg.n_layers):
        layer_cfg = cfg.for_layer(i)
        spec = token_mixer_for_layer(cfg, i).stream_start
        start = stream_rows(params[f"layer_{i}"]["stream_start"], batch)
        caches.append(spec.cache(layer_cfg, i, start, max_len, dtype))
    return caches


class StreamAggregate(nn.Module):
    """[B P, S, D] -> [B, S, D]: w = softmax(MLP(h_1 .. h_P concatenated)) in float32, smoothed to
    w (1 - s) + s / P, then sum_p w_p h_p. The MLP reads the streams interleaved per feature (index d P + p), as the
    released checkpoints were trained: Linear(P D -> D), SiLU, Linear(D -> P), both with biases."""

    streams: int
    smooth: float
    init_std: float
    dtype: Any

    @nn.compact
    def __call__(self, x_ND):
        p = self.streams
        n, s, d = x_ND.shape
        x_BPSD = x_ND.reshape(n // p, p, s, d)
        features_BSX = x_BPSD.transpose(0, 2, 3, 1).reshape(n // p, s, d * p)

        def dense(features, axes, name):
            return nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32,
                            kernel_init=normal_init(self.init_std, axes),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]), name=name)

        hidden_BSD = nn.silu(dense(d, (None, "embed"), "hidden")(features_BSX))
        logits_BSP = dense(p, ("embed", None), "weights")(hidden_BSD)
        w_BSP = jax.nn.softmax(logits_BSP.astype(jnp.float32), axis=-1)
        w_BSP = w_BSP * (1 - self.smooth) + self.smooth / p
        out_BSD = jnp.einsum("bpsd,bsp->bsd", x_BPSD.astype(jnp.float32), w_BSP)
        return out_BSD.astype(x_ND.dtype)


def start_flops_per_token(cfg, layer: int) -> float:
    """Forward FLOPs one stream's token spends on the layer's learned start (attention: the prefix keys)."""
    spec = token_mixer_for_layer(cfg, layer).stream_start
    if spec.flops_per_token is None:
        return 0.0
    return spec.flops_per_token(cfg.for_layer(layer), layer, cfg.parscale.prefix_tokens)


def aggregate_flops_per_token(cfg) -> float:
    p, d = cfg.parscale.streams, cfg.d_model
    return 2 * p * d * d + 2 * d * p + 2 * p * d  # the MLP, then the weighted sum


def parscale_params(cfg) -> int:
    """Parameters ParScale adds: every layer's learned starts (all streams) and the aggregation MLP."""
    p, d, sec = cfg.parscale.streams, cfg.d_model, cfg.parscale
    starts = 0
    for i in range(cfg.n_layers):
        shapes = token_mixer_for_layer(cfg, i).stream_start.params(cfg.for_layer(i), i, sec.prefix_tokens)
        starts += p * sum(math.prod(shape) for shape, _ in shapes.values())
    return starts + (p * d * d + d) + (d * p + p)
