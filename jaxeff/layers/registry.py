"""Name -> mixer registries. New architectures plug in here without touching the model or trainer.

A token mixer is a Linen module built as `module(cfg=ModelConfig, layer_index=int, dtype=dtype)`
and called as `mixer(x_BSD, positions_BS, cache) -> (y_BSD, new_cache)`. `cache` is None in
training; in decoding it is whatever the spec's `init_cache` returned (a KV cache, a recurrent
state, a pruned per-head cache, ...), and the mixer returns its updated version.

A channel mixer is built the same way and called as `mixer(x_BSD) -> (y_BSD, aux)`, where `aux` is
a dict of scalars: keys starting with "loss/" are added to the training loss (MoE balance losses),
the rest are logged as metrics.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

from jaxeff.config import ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class TokenMixerSpec:
    name: str
    module: type
    # (cfg, seq_len, layer) -> forward matmul FLOPs per token (training multiplies by 3).
    flops_per_token: Callable[[ModelConfig, int, int], float]
    # (cfg, layer, batch, max_len, dtype) -> cache pytree for decoding.
    init_cache: Callable[[ModelConfig, int, int, int, Any], Any]


@dataclasses.dataclass(frozen=True)
class ChannelMixerSpec:
    name: str
    module: type
    # (cfg, layer) -> forward FLOPs per token (MoE: only the experts a token uses).
    flops_per_token: Callable[[ModelConfig, int], float]


TOKEN_MIXERS: dict[str, TokenMixerSpec] = {}
CHANNEL_MIXERS: dict[str, ChannelMixerSpec] = {}


def register_token_mixer(spec: TokenMixerSpec) -> TokenMixerSpec:
    TOKEN_MIXERS[spec.name] = spec
    return spec


def register_channel_mixer(spec: ChannelMixerSpec) -> ChannelMixerSpec:
    CHANNEL_MIXERS[spec.name] = spec
    return spec


def _lookup(table: dict, name: str, key: str):
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key}: unknown mixer '{name}'{hint}; registered: {', '.join(sorted(table))}")
    return table[name]


def token_mixer_for_layer(cfg: ModelConfig, layer: int) -> TokenMixerSpec:
    return _lookup(TOKEN_MIXERS, cfg.mixer_pattern[layer % len(cfg.mixer_pattern)], "model.mixer_pattern")


def channel_mixer_for_layer(cfg: ModelConfig, layer: int) -> ChannelMixerSpec:
    name = cfg.channel_mixer_pattern[layer % len(cfg.channel_mixer_pattern)]
    return _lookup(CHANNEL_MIXERS, name, "model.channel_mixer_pattern")


def check_mixer_names(cfg: ModelConfig) -> None:
    """Raise ConfigError for any unknown mixer name in the patterns."""
    for name in cfg.mixer_pattern:
        _lookup(TOKEN_MIXERS, name, "model.mixer_pattern")
    for name in cfg.channel_mixer_pattern:
        _lookup(CHANNEL_MIXERS, name, "model.channel_mixer_pattern")
