"""Quantization-aware training settings (`train.qat`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from jaxeff.config.base import NonNegativeInt, Section

# The projection matrices of the token and channel mixers: attention / linear-attention / mLSTM projections, the
# MLPs, MoE experts. Left in float: the embedding, the output head, norms, biases, the MoE router, the recurrent and
# state-space parameters (companion a/b/c, lrpe_theta) and ParScale's stream starts, as BitNet b1.58 keeps its
# embedding, head and norms in high precision.
DEFAULT_QUANTIZED = ["layer_*/mixer/*/kernel", "layer_*/channel/*/kernel", "layer_*/channel/w_in",
                     "layer_*/channel/w_out"]
# mLSTM's input and forget gates: D -> heads projections computed in float32 for the exponential gating's stability.
DEFAULT_KEEP_FLOAT = ["*/igate/kernel", "*/fgate/kernel"]


class QatConfig(Section):
    """Quantization-aware training: weights fake-quantized in the forward pass (straight-through gradients)."""

    kind: Literal["none", "ternary"] = "none"
    """`none`, or `ternary`: weights {-1, 0, +1} x an absmean scale (BitNet b1.58 / BitCPM4); see docs/methods/qat.md"""
    group_size: NonNegativeInt = 0
    """0: one absmean scale per parameter tensor (BitNet b1.58). G > 0: the tensor, read in its stored row-major order, is cut into runs of G consecutive elements, each with its own scale (for a [in, out] kernel with G dividing out: G output features of one input row); G must divide the size of every quantized parameter"""
    params: list[str] = Field(default_factory=lambda: list(DEFAULT_QUANTIZED))
    """the parameters quantized: shell patterns (`*` also crosses `/`) over paths such as `layer_0/mixer/q/kernel`; add `head/kernel` or `embed/embedding` to quantize the output head or the embedding"""
    keep_float: list[str] = Field(default_factory=lambda: list(DEFAULT_KEEP_FLOAT))
    """patterns of parameters left in float even when `params` matches them (default: mLSTM's input/forget gates)"""

    @property
    def enabled(self) -> bool:
        return self.kind != "none"
