"""ParScale's parallel streams (`model.parscale`): P copies of every input through one shared model.

Chen et al. 2025 (QwenLM/ParScale): each stream p starts every attention layer from its own learned prefix of
`prefix_tokens` keys and values; the streams share all other weights, and after the final norm a small MLP over
the concatenated streams weighs them (softmax, smoothed by `attn_smooth`) into one hidden state per token.
`streams: 1` is the plain model. What a stream's learned start is for other mixers: docs/models/parscale.md.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from jaxeff.config.base import Float, PositiveInt, Section


class ParScaleConfig(Section):
    """Parallel streams of one input (ParScale); `streams: 1` turns it off."""

    streams: PositiveInt = 1
    """P: copies of each input run side by side, each from its own learned prefix or initial state (1 = off)"""
    prefix_tokens: PositiveInt = 48
    """learned key/value tokens per stream and attention layer (the released models: 48)"""
    attn_smooth: Annotated[Float, Field(ge=0, lt=1)] = 0.01
    """the stream weights w become w (1 - s) + s / P, so no stream's weight reaches 0"""

    @property
    def enabled(self) -> bool:
        return self.streams > 1
