"""LoRA adapter settings (`train.lora`): selected matrices trained as W + (alpha / r) A B^T (docs/methods/lora.md)."""

from __future__ import annotations

from typing import Literal

from jaxeff.config.base import NonNegativeInt, PositiveFloat, Section


class LoraConfig(Section):
    """Low-rank adapters (Hu et al. 2021); `rank: 0` turns them off."""

    rank: NonNegativeInt = 0
    """r: the adapters' rank (0 = off; at most min(in, out) of each adapted matrix)"""
    alpha: PositiveFloat = 16.0
    """the adapter's output is scaled by alpha / r, so changing r does not change the update's size"""
    layers: str = r"^layer_\d+/(mixer|channel)/[^/]+/kernel$"
    """regular expression on parameter paths (`layer_0/mixer/q/kernel`): the matrices that get an adapter"""
    freeze: Literal["all", "adapted"] = "all"
    """`all`: only the adapters train (fine-tuning); `adapted`: only the adapted matrices are frozen, embeddings,
    norms, the head and every other parameter train as usual (LoRA pretraining, the baseline of SST's paper)"""
