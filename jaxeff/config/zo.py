"""Zeroth-order optimizer settings (`train.zo`, used with `train.optimizer: zo`; docs/methods/zo.md)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, field_validator

from jaxeff.config.base import ConfigError, Float, NonNegativeInt, PositiveFloat, PositiveInt, Section

TRAINABLE_KEYWORDS = ("all", "embeddings", "lora")


class ZoConfig(Section):
    """Zeroth-order fine-tuning (ZOODiP): gradients estimated from forward passes only."""

    probes: PositiveInt = 4
    """n: seeded Gaussian perturbations per step (n + 1 forward passes)"""
    eps: PositiveFloat = 1e-3
    """perturbation size: g_i = (L(theta + eps z_i) - L(theta)) / eps"""
    subspace_every: NonNegativeInt = 0
    """tau: every tau steps a PCA of the last tau snapshots of the trainable parameters picks the low-variance
    directions that the estimate is projected off until the next PCA (0 = no subspace gradient; the snapshots
    cost tau copies of the trainable parameters)"""
    variance_threshold: Annotated[Float, Field(gt=0, lt=1)] = 1e-3
    """nu: principal components are kept until they explain more than 1 - nu of the snapshots' variance; the rest
    (together at most nu of it) are projected off"""
    trainable: str = "all"
    """what the estimate updates: `all`, `embeddings` (the token embedding table), `lora` (the adapters of `train.lora`), or a
    regular expression searched in parameter paths such as `layer_1/mixer/q/kernel`; everything else is frozen"""
    frozen_int8: bool = False
    """store the frozen matrices as int8 with one float32 scale per output channel (per row of an embedding),
    dequantized inside the forward passes"""

    @field_validator("trainable")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if value not in TRAINABLE_KEYWORDS:
            try:
                re.compile(value)
            except re.error as e:
                raise ConfigError(f"train.zo.trainable={value!r} is neither one of {', '.join(TRAINABLE_KEYWORDS)} "
                                  f"nor a valid regular expression ({e}); e.g. 'layer_1/' selects the second "
                                  "layer") from None
        return value
