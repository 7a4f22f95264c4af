"""What every Hugging Face layout is built from: the tensor map entry, the common weight transforms, config reads.

A layout is a function `layout(config, source) -> (ModelConfig, tensors)`: `config` is the directory's parsed
config.json, `source` the `--from DIR` prefix of error messages, and `tensors(padded_vocab)` lists one TensorMap per
tensor of the checkpoint (the embedding and head rows are padded to `padded_vocab`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from jaxeff.errors import UserError

if TYPE_CHECKING:
    from jaxeff.config import ModelConfig

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    source: str  # name in the safetensors files
    target: tuple[str, ...]  # path in jaxeff's params; () for a tensor the released model never reads (`unused`)
    transform: Transform


def unused(source: str) -> TensorMap:
    """A tensor the released files may hold but their model never reads: accepted when present, not imported."""
    return TensorMap(source, (), lambda w: w)


Layout = Callable[[dict[str, Any], str], "tuple[ModelConfig, Callable[[int], list[TensorMap]]]"]


def need(config: dict[str, Any], *names: str, source: str) -> Any:
    """The first of `names` present in the config (names differ between releases)."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    raise UserError(f"{source}: config.json has no '{names[0]}'; is this a complete Hugging Face config?")


def linear(shape: tuple[int, ...]) -> Transform:
    """torch Linear weight [out, in] -> jaxeff kernel [in, *out_split]."""
    return lambda w: w.T.reshape(shape)


def linear_to_heads(heads: int, d_out: int) -> Transform:
    """[D, H*d] out-projection weight -> kernel [H, d, D]."""
    return lambda w: w.T.reshape(heads, d_out, -1)


def pad_rows(rows: int) -> Transform:
    return lambda w: np.pad(w, ((0, rows - w.shape[0]), (0, 0)))


def head_kernel(rows: int) -> Transform:
    return lambda w: np.pad(w, ((0, rows - w.shape[0]), (0, 0))).T


def fused_rows(total: int, start: int, stop: int, shape: tuple[int, ...]) -> Transform:
    """Rows [start, stop) of a fused torch Linear weight [total, in] (e.g. q, k and v stacked) -> kernel `shape`
    ([in, *out_split]). A weight without exactly `total` rows is a ValueError (so a wrong width is not sliced)."""
    def part(w_OI: np.ndarray) -> np.ndarray:
        if w_OI.shape[0] != total:
            raise ValueError(f"{w_OI.shape[0]} rows, not {total}")
        return w_OI[start:stop].T.reshape(shape)

    return part
