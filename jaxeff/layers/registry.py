"""Name -> mixer registries: the one place a mixer is bound to its name, module, config section, checks, FLOPs
and decode cache. Each layer file registers its own spec; nothing else lists mixer names (the config validates
`model.mixer_pattern` / `model.channel_mixer_pattern` against these tables, and the JSON schema and docs/config.md
list them from here).

A token mixer is a Linen module built as `module(cfg=ModelConfig, layer_index=int, dtype=dtype)` and called as
`mixer(x_BSD, positions_BS, cache) -> (y_BSD, new_cache)`. `cache` is None in training; in decoding it is
whatever the spec's `init_cache` returned (a KV cache, a recurrent state, a pruned per-head cache, ...), and the
mixer returns its updated version.

A channel mixer is built the same way and called as `mixer(x_BSD) -> (y_BSD, aux)`, where `aux` is a dict of
scalars: keys starting with "loss/" are added to the training loss (MoE balance losses), the rest are logged.

This module reads configs only through their attributes (no import of `jaxeff.config`): the config package sits
above the layers and asks them which names exist.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

from jaxeff.errors import ConfigError

if TYPE_CHECKING:
    from jaxeff.config import Config, ModelConfig

# (cfg, "model.<section>", mesh axis sizes or None before the mesh is resolved) -> None, or ConfigError
Check = Callable[["Config", str, "Mapping[str, int] | None"], None]

# What a decoding cache holds, for reports: every key and value (`kv`), a fixed-size recurrent state (`state`),
# or the keys and values of the blocks a sparse pattern reads again (`pruned`).
CacheKind = Literal["kv", "state", "pruned"]


@dataclasses.dataclass(frozen=True)
class StreamStart:
    """Where each ParScale stream of a mixer begins: learned values in place of the empty decode cache.

    `params(cfg, layer, prefix_tokens)` -> {name: (shape for one stream, logical axes)}; the model stores each as
    [P, *shape]. `cache(cfg, layer, start, max_len, dtype)` -> the decode cache that holds the start, with room for
    `max_len` tokens after it; `start` maps each name to [N, *shape], one row per batch row and stream. The mixer
    then runs from that cache in training as in decoding (its prefill path), so gradients reach the start through
    the cache. `flops_per_token(cfg, layer, prefix_tokens)`: forward FLOPs a token spends on reading the start
    (attention's prefix keys); None when the start costs nothing per token (a recurrent state).
    """

    params: Callable[[ModelConfig, int, int], dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]]
    cache: Callable[[ModelConfig, int, dict[str, Any], int, Any], Any]
    flops_per_token: Callable[[ModelConfig, int, int], float] | None = None


@dataclasses.dataclass(frozen=True)
class TokenMixerSpec:
    name: str
    module: type
    # (cfg, seq_len, layer) -> forward matmul FLOPs per token (training multiplies by 3).
    flops_per_token: Callable[[ModelConfig, int, int], float]
    # (cfg, layer, batch, max_len, dtype) -> cache pytree for decoding.
    init_cache: Callable[[ModelConfig, int, int, int, Any], Any]
    cache_kind: CacheKind
    section: str | None = None  # the ModelConfig field this mixer reads (`model.<section>`), if any
    check: Check | None = None  # consistency of the section with the rest of the config; runs when a layer uses it
    stream_start: StreamStart | None = None  # ParScale's learned per-stream start; None: the mixer has none


@dataclasses.dataclass(frozen=True)
class ChannelMixerSpec:
    name: str
    module: type
    # (cfg, layer) -> forward FLOPs per token (MoE: only the experts a token uses).
    flops_per_token: Callable[[ModelConfig, int], float]
    section: str | None = None
    check: Check | None = None
    # (cfg, layer) -> parameters of this layer a token does not use (MoE: the experts it is not routed to).
    inactive_params: Callable[[ModelConfig, int], int] | None = None
    # cfg -> the config decoding builds the model from, when this mixer must run otherwise there: a token's output
    # may not depend on which other tokens share its call (MoE: no capacity, so no token is dropped), or one call
    # over k tokens (a prefill, a speculative verify) would differ from k one-token calls.
    for_decoding: Callable[[ModelConfig], ModelConfig] | None = None


TOKEN_MIXERS: dict[str, TokenMixerSpec] = {}
CHANNEL_MIXERS: dict[str, ChannelMixerSpec] = {}


def register_token_mixer(spec: TokenMixerSpec) -> TokenMixerSpec:
    TOKEN_MIXERS[spec.name] = spec
    return spec


def register_channel_mixer(spec: ChannelMixerSpec) -> ChannelMixerSpec:
    CHANNEL_MIXERS[spec.name] = spec
    return spec


def unknown_name_message(name: str, table: Mapping[str, Any]) -> str | None:
    """None for a registered name; otherwise 'unknown mixer ... (did you mean ...); registered: ...'."""
    if name in table:
        return None
    close = difflib.get_close_matches(name, list(table), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown mixer '{name}'{hint}; registered: {', '.join(sorted(table))}"


def _lookup(table: Mapping[str, Any], name: str, key: str):
    message = unknown_name_message(name, table)
    if message:
        raise ConfigError(f"{key}: {message}")
    return table[name]


def token_mixer_for_layer(cfg: ModelConfig, layer: int) -> TokenMixerSpec:
    return _lookup(TOKEN_MIXERS, cfg.token_mixer(layer), "model.mixer_pattern")


def channel_mixer_for_layer(cfg: ModelConfig, layer: int) -> ChannelMixerSpec:
    return _lookup(CHANNEL_MIXERS, cfg.channel_mixer(layer), "model.channel_mixer_pattern")


def specs_in_use(cfg: ModelConfig) -> list[TokenMixerSpec | ChannelMixerSpec]:
    """The distinct specs the model's layers use, token mixers first, in pattern order."""
    seen: dict[str, Any] = {}
    for name in cfg.mixer_pattern:
        seen.setdefault(f"token/{name}", _lookup(TOKEN_MIXERS, name, "model.mixer_pattern"))
    for name in cfg.channel_mixer_pattern:
        seen.setdefault(f"channel/{name}", _lookup(CHANNEL_MIXERS, name, "model.channel_mixer_pattern"))
    return list(seen.values())


def check_mixers(cfg: Config, mesh_shape: Mapping[str, int] | None = None) -> None:
    """Run the cross-field check of every mixer the model uses (`mesh_shape`: resolved axis sizes, when known)."""
    for spec in specs_in_use(cfg.model):
        if spec.check is not None:
            spec.check(cfg, f"model.{spec.section}" if spec.section else "model", mesh_shape)


def recurrent_call(cache, seq_len: int, *, full: Callable[[], Any], step: Callable[[Any], tuple[Any, Any]],
                   prefill: Callable[[Any], tuple[Any, Any]]):
    """The cache path shared by recurrent mixers: (y, new_cache) with new_cache = {"state": ...} or None.

    No cache (training): `full()`. One token with a cache: `step(state)`, the recurrence, whose output has no
    sequence axis (it is added here). Several tokens with a cache (prefill, or a chunk of it): `prefill(state)`, the
    parallel form continued from the state.
    """
    if cache is None:
        return full(), None
    if seq_len == 1:
        y, state = step(cache["state"])
        return y[:, None], {"state": state}
    y, state = prefill(cache["state"])
    return y, {"state": state}
