"""SpaceTime's companion-matrix SSM as a token mixer (`model.mixer_pattern: [companion]`, `model.companion`).

    u_BSD = x                                   every channel is one SSM input
    y_c   = SSM_{c mod K}(u_c) + skip_c u_c     x_t = A x_{t-1} + b u_t, y_t = c . x_t; A = shift + a e_d^T
    out   = y W                                 a linear layer mixes the channels

Training runs the SSMs as FFT convolutions with their kernels (pallas_kernels.companion_ssm), per shard; with
mesh.sequence > 1 each device convolves its own chunk and adds the free response of the state entering it (one
all-gather of [B, D, d] chunk states per layer, pallas_kernels/companion_ssm/sequence_parallel.py). Decoding keeps
one d-sized state per channel (constant memory). With `norm_order: 1` the column a is L1-normalised before use,
as in SpaceTime, which keeps the companion matrix's eigenvalues in the unit disc.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import flax.linen as nn
import jax.numpy as jnp

from jaxeff.errors import ConfigError
from jaxeff.layers.common import output_std, projection
from jaxeff.layers.registry import StreamStart, TokenMixerSpec, recurrent_call, register_token_mixer
from jaxeff.parallel.sharding import per_sequence_shard
from pallas_kernels.companion_ssm import companion_ssm, companion_step
from pallas_kernels.companion_ssm.sequence_parallel import sharded_companion_ssm

if TYPE_CHECKING:
    from jaxeff.config import Config, ModelConfig


def l1_normalise(a_UX, eps: float = 1e-4):
    """a / |a|_1 per kernel; a near-zero column is left as it is (its norm would blow it up)."""
    norm = jnp.sum(jnp.abs(a_UX), axis=-1, keepdims=True)
    return jnp.where(norm > eps, a_UX / jnp.maximum(norm, eps), a_UX)


class CompanionMixer(nn.Module):
    cfg: ModelConfig
    layer_index: int
    dtype: jnp.dtype = jnp.float32

    def _ssm_params(self):
        """(a, b, c) per channel [D, d] (kernels repeated over the channels) and the skip [D] or None."""
        cfg, sec = self.cfg, self.cfg.companion
        k, d = sec.n_kernels, sec.state_dim
        init = lambda std: nn.with_logical_partitioning(nn.initializers.normal(std), (None, None))  # noqa: E731
        a = self.param("a", init(1.0), (k, d), jnp.float32)
        b = self.param("b", init(d**-0.5), (k, d), jnp.float32)
        c = self.param("c", init(d**-0.5), (k, d), jnp.float32)
        if sec.norm_order == 1:
            a = l1_normalise(a)
        repeat = cfg.d_model // k
        a, b, c = (jnp.tile(x, (repeat, 1)) for x in (a, b, c))
        skip = None
        if sec.skip:
            skip = self.param("skip", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (cfg.d_model,),
                              jnp.float32)
        return a, b, c, skip

    @nn.compact
    def __call__(self, x_BSD, positions_BS, cache=None):
        a, b, c, skip = self._ssm_params()
        impl = self.cfg.companion.kernel_impl
        u = x_BSD.astype(jnp.float32)  # FFTs and the recurrence in float32
        y_BSD, new_cache = recurrent_call(
            cache, x_BSD.shape[1],
            full=lambda: self._full(u, a, b, c, skip, impl),
            step=lambda state: companion_step(u[:, 0], a, b, c, skip, state),
            prefill=lambda state: companion_ssm(u, a, b, c, skip, initial_state=state, return_final_state=True,
                                                impl=impl))
        out = projection(self.cfg.d_model, -1, (None, "embed"), output_std(self.cfg), self.dtype, "out")
        return out(y_BSD.astype(self.dtype)), new_cache

    @staticmethod
    def _full(u_BSD, a, b, c, skip, impl):
        """The whole sequence, per shard; with mesh.sequence > 1 the state-passing form (one all-gather of
        [B, D, d] chunk states per layer, pallas_kernels/companion_ssm/sequence_parallel.py). Rows are independent
        and the parameters are replicated into the shard_map; without a skip the ops get none (not a zero one)."""
        args, in_axes = (u_BSD, a, b, c), (("batch", "length", None),) + ((None, None),) * 3
        if skip is not None:
            args, in_axes = (*args, skip), (*in_axes, (None,))
        return per_sequence_shard(functools.partial(companion_ssm, impl=impl),
                                  functools.partial(sharded_companion_ssm, impl=impl), args, in_axes,
                                  ("batch", "length", None))



def init_companion_cache(cfg: ModelConfig, layer: int, batch: int, max_len: int, dtype):
    """A zero state [batch, d_model, state_dim] in float32, whatever the length."""
    return {"state": jnp.zeros((batch, cfg.d_model, cfg.companion.state_dim), jnp.float32)}


def companion_flops_per_token(cfg: ModelConfig, seq_len: int, layer: int) -> float:
    """The output projection plus the FFT convolution (~ 3 FFTs of size 2S per channel: ~ 3 * 5 log2(2S) flops per
    token and channel; the kernels themselves are per sequence, not per token)."""
    import math

    fft = 3 * 5 * math.log2(max(2 * seq_len, 2)) * cfg.d_model
    return 2 * cfg.d_model * cfg.d_model + fft


def check_companion(cfg: Config, key: str, mesh_shape=None) -> None:
    n_kernels, d_model = cfg.model.companion.n_kernels, cfg.model.d_model
    if d_model % n_kernels:
        raise ConfigError(f"{key}.n_kernels={n_kernels} does not divide model.d_model={d_model}; every kernel "
                          "serves the same number of channels")


def learned_state_params(cfg: ModelConfig, layer: int, prefix_tokens: int):
    """ParScale: a stream's learned initial state [D, d] (the free response c A^t x0 then adds to every output)."""
    return {"state": ((cfg.d_model, cfg.companion.state_dim), (None, None))}


def cache_from_learned_state(cfg: ModelConfig, layer: int, start, max_len: int, dtype):
    return {"state": start["state"].astype(jnp.float32)}


register_token_mixer(TokenMixerSpec("companion", CompanionMixer, companion_flops_per_token, init_companion_cache,
                                    cache_kind="state", section="companion", check=check_companion,
                                    stream_start=StreamStart(learned_state_params, cache_from_learned_state)))
