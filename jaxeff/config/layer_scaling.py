"""Per-layer widths: OpenELM's layer-wise scaling, or explicit lists (`model.layer_scaling`).

A layer's shape is three numbers: query heads, key/value heads and the channel mixer's hidden width. Every token
mixer whose width is per head (attention, lightning, mLSTM, S2) and every channel mixer reads them from the
model config, so the model gives each layer its own copy of that config (`ModelConfig.for_layer`) and no mixer
knows about layer scaling.

OpenELM (Mehta et al. 2024, corenet's general_gpt): with L layers, layer i gets
`alpha_i = linspace(alpha_min, alpha_max, L)[i]` and `beta_i = linspace(beta_min, beta_max, L)[i]`, both rounded
to 2 decimals; query width `make_divisible(alpha_i d_model, head_dim groups)`, query heads = width / head_dim,
key/value heads = query heads / groups, FFN width `make_divisible(beta_i d_model, ffn_divisor)`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field

from jaxeff.config.base import ConfigError, Float, PositiveInt, Section


@dataclasses.dataclass(frozen=True)
class LayerShape:
    n_heads: int
    n_kv_heads: int
    mlp_dim: int


def make_divisible(value: float, divisor: int) -> int:
    """The multiple of `divisor` nearest to `value` (at least `divisor`), rounded up when rounding to the nearest
    would lose more than 10% (corenet's rule, from the MobileNet code)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def linspace_2dp(first: float, last: float, n: int) -> list[float]:
    """n evenly spaced values from first to last, each rounded to 2 decimals (numpy's linspace, then round)."""
    if n == 1:
        return [round(first, 2)]
    return [round(first + (last - first) * i / (n - 1), 2) for i in range(n)]


class LayerScalingConfig(Section):
    """Per-layer query heads, key/value heads and channel-mixer width: `openelm` (layer-wise scaling from `alpha` and
    `beta`) or `explicit` lists; `none` gives every layer `model.n_heads`, `model.n_kv_heads`, `model.mlp_dim`.
    Needs `model.head_dim`. See [models/openelm.md](models/openelm.md)"""

    kind: Literal["none", "openelm", "explicit"] = "none"
    """`none`, `openelm` (from alpha, beta, groups) or `explicit` (the three lists)"""
    alpha: list[Float] = Field(default_factory=lambda: [0.5, 1.0], min_length=2, max_length=2)
    """`openelm`: query width multipliers of the first and the last layer (times d_model)"""
    beta: list[Float] = Field(default_factory=lambda: [0.5, 4.0], min_length=2, max_length=2)
    """`openelm`: channel-mixer width multipliers of the first and the last layer (times d_model)"""
    groups: PositiveInt = 4
    """`openelm`: query heads per key/value head (the released models: 4)"""
    ffn_divisor: PositiveInt = 256
    """`openelm`: channel-mixer widths are multiples of this"""
    query_heads: list[PositiveInt] | None = None
    """`explicit`: query heads of each layer (n_layers values)"""
    kv_heads: list[PositiveInt] | None = None
    """`explicit`: key/value heads of each layer (n_layers values)"""
    mlp_dims: list[PositiveInt] | None = None
    """`explicit`: channel-mixer hidden width of each layer (n_layers values)"""

    def shapes(self, n_layers: int, d_model: int, head_dim: int | None) -> list[LayerShape] | None:
        """Every layer's shape, or None for `none`. ConfigError naming the key when the settings cannot work."""
        if self.kind == "none":
            return None
        if head_dim is None:
            raise ConfigError(f"model.layer_scaling.kind={self.kind} varies the head count per layer at a fixed head "
                              "width: set model.head_dim (OpenELM: 64, 128 for the 3B model)")
        if self.kind == "explicit":
            return self._explicit(n_layers)
        alphas = linspace_2dp(*self.alpha, n_layers)
        betas = linspace_2dp(*self.beta, n_layers)
        shapes = []
        for alpha, beta in zip(alphas, betas):
            heads = make_divisible(alpha * d_model, head_dim * self.groups) // head_dim
            shapes.append(LayerShape(heads, heads // self.groups, make_divisible(beta * d_model, self.ffn_divisor)))
        return shapes

    def _explicit(self, n_layers: int) -> list[LayerShape]:
        lists = {"query_heads": self.query_heads, "kv_heads": self.kv_heads, "mlp_dims": self.mlp_dims}
        for key, values in lists.items():
            if values is None or len(values) != n_layers:
                got = "nothing" if values is None else f"{len(values)} values"
                raise ConfigError(f"model.layer_scaling.{key}: kind=explicit needs one value per layer "
                                  f"(model.n_layers={n_layers}), got {got}")
        return [LayerShape(h, kv, f) for h, kv, f in zip(self.query_heads, self.kv_heads, self.mlp_dims)]
