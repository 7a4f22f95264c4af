"""SwiGLU channel mixer."""

import flax.linen as nn
import jax.numpy as jnp

from jaxeff.config import ModelConfig
from jaxeff.layers.common import output_std, projection
from jaxeff.layers.registry import ChannelMixerSpec, register_channel_mixer


class SwiGLU(nn.Module):
    cfg: ModelConfig
    layer_index: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BSD):
        cfg = self.cfg
        gate_BSM = projection(cfg.mlp_dim, -1, ("embed", "mlp"), cfg.init_std, self.dtype, "gate")(x_BSD)
        up_BSM = projection(cfg.mlp_dim, -1, ("embed", "mlp"), cfg.init_std, self.dtype, "up")(x_BSD)
        down = projection(cfg.d_model, -1, ("mlp", "embed"), output_std(cfg), self.dtype, "down")
        return down(nn.silu(gate_BSM) * up_BSM), {}


def swiglu_flops_per_token(cfg: ModelConfig) -> float:
    return 2 * 3 * cfg.d_model * cfg.mlp_dim


register_channel_mixer(ChannelMixerSpec("swiglu", SwiGLU, swiglu_flops_per_token))
