"""LongGen's sink + window attention (`model.mixer_pattern: [sink_window]`, settings in `model.s2`): query block i
reads key block j iff j < sink_blocks or i - j < local_blocks. The S2 mixer with this pattern (see s2.py), so it
shares S2's kernels, its pruned decode cache (sink slots and a ring for the window) and its sequence-parallel form
(the sinks are the first blocks of the whole sequence, on the first device's chunk).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxeff.layers.registry import TokenMixerSpec, register_token_mixer
from jaxeff.layers.s2 import S2Attention, check_pallas_block_size, init_pruned_cache, s2_flops_per_token

if TYPE_CHECKING:
    from jaxeff.config import Config, ModelConfig


def sink_window_pattern(cfg: ModelConfig) -> dict:
    sec = cfg.s2
    return {"local_blocks": sec.local_blocks, "vert_stride": None, "sink_blocks": sec.sink_blocks}


class SinkWindowAttention(S2Attention):
    pattern = staticmethod(sink_window_pattern)


def check_sink_window(cfg: Config, key: str, mesh_shape=None) -> None:
    check_pallas_block_size(cfg, key)


register_token_mixer(TokenMixerSpec("sink_window", SinkWindowAttention, s2_flops_per_token(sink_window_pattern),
                                    init_pruned_cache(sink_window_pattern), cache_kind="pruned", section="s2",
                                    check=check_sink_window))
