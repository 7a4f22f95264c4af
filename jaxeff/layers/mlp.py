"""Gated MLP channel mixers: SwiGLU (silu gate) and TransNormerLLM's SGLU (no activation)."""

from __future__ import annotations

from typing import Callable, TYPE_CHECKING

import flax.linen as nn
import jax.numpy as jnp

from jaxeff.layers.common import output_std, projection
from jaxeff.layers.registry import ChannelMixerSpec, register_channel_mixer

if TYPE_CHECKING:
    from jaxeff.config import ModelConfig


def identity(x):
    return x


class GatedMLP(nn.Module):
    """down(activation(x W_gate) * (x W_up)), no biases."""

    cfg: ModelConfig
    layer_index: int
    dtype: jnp.dtype = jnp.float32
    activation: Callable = nn.silu

    @nn.compact
    def __call__(self, x_BSD):
        cfg = self.cfg
        gate_BSM = projection(cfg.mlp_dim, -1, ("embed", "mlp"), cfg.init_std, self.dtype, "gate")(x_BSD)
        up_BSM = projection(cfg.mlp_dim, -1, ("embed", "mlp"), cfg.init_std, self.dtype, "up")(x_BSD)
        down = projection(cfg.d_model, -1, ("mlp", "embed"), output_std(cfg), self.dtype, "down")
        return down(self.activation(gate_BSM) * up_BSM), {}


class SwiGLU(GatedMLP):
    activation: Callable = nn.silu


class SGLU(GatedMLP):
    """TransNormerLLM's channel mixer: ((x W1) * (x W2)) W3; its ablation found no loss without an activation."""

    activation: Callable = identity


def gated_mlp_flops_per_token(cfg: ModelConfig, layer: int = 0) -> float:
    return 2 * 3 * cfg.d_model * cfg.mlp_dim


register_channel_mixer(ChannelMixerSpec("swiglu", SwiGLU, gated_mlp_flops_per_token))
register_channel_mixer(ChannelMixerSpec("sglu", SGLU, gated_mlp_flops_per_token))
