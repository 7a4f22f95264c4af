"""Frozen matrices stored in int8 (`train.zo.frozen_int8`, jaxeff/train/zo.py) and the selection of trainable
parameters (`train.zo.trainable`): the parameter layout a zeroth-order run keeps, and the way back to the model's.

A frozen parameter with two or more axes becomes {"int8": q, "scale": s}: s = max |w| / 127 per output channel (the
last axis; per row of an embedding table, whose rows are its tokens), kept with w's rank (1 on the reduced axes),
and q = round(w / s) clipped to [-127, 127]; q * s is within s / 2 of w. `dequantize_params` turns a tree in this
layout back into the model's (an identity on plain trees); `int8_abstract` gives the layout's shapes, so the loader
can restore such a checkpoint and hand out float parameters (export, generate, init_from).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxeff.config import ConfigError
from jaxeff.models.lora import is_adapter

INT8_KEYS = frozenset({"int8", "scale"})
QMAX = 127


def is_quantized(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node.keys()) == INT8_KEYS


def channel_axis(name: str, ndim: int) -> int:
    """The axis that keeps its own scale: the rows of an embedding table, the output channels of a kernel."""
    return 0 if name.rsplit("/", 1)[-1] == "embedding" else ndim - 1


def quantize(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """(q int8, s float32 with w's rank, 1 on every axis but `axis`): q = round(w / s), s = max|w| / 127."""
    reduce = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=reduce, keepdims=True)
    scale = jnp.where(amax > 0, amax / QMAX, 1.0)
    q = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize(node: Mapping, dtype=jnp.float32) -> jax.Array:
    return (node["int8"].astype(jnp.float32) * node["scale"]).astype(dtype)


def dequantize_params(params: Any) -> Any:
    """The model's parameter tree: quantized leaves dequantized, everything else as it is (identity for plain
    parameters, so callers need not know whether the run quantized anything)."""
    return jax.tree.map(lambda x: dequantize(x) if is_quantized(x) else x, params, is_leaf=is_quantized)


def quantized_as_plain(params: Any) -> Any:
    """The model's tree with each quantized node replaced by its int8 leaf (same shape as the float parameter):
    for comparing shapes with a model or a checkpoint."""
    return jax.tree.map(lambda x: x["int8"] if is_quantized(x) else x, params, is_leaf=is_quantized)


def select_trainable(names: list[str], trainable: str) -> list[str]:
    """The parameter paths `train.zo.trainable` selects (`lora`: the adapters' A and B); ConfigError when none."""
    if trainable == "lora":
        chosen = [n for n in names if is_adapter(n)]
        if not chosen:
            raise ConfigError("train.zo.trainable=lora but the model has no LoRA adapters; set train.lora.rank "
                              "(e.g. train.lora.rank=8) or choose other trainable parameters")
        return chosen
    if trainable == "all":
        chosen = list(names)
    elif trainable == "embeddings":
        chosen = [n for n in names if n.rsplit("/", 1)[-1] == "embedding"]
    else:
        chosen = [n for n in names if re.search(trainable, n)]
    if not chosen:
        raise ConfigError(f"train.zo.trainable={trainable!r} selects no parameter; this model's parameters are "
                          f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")
    return chosen


def path_names(tree) -> list[str]:
    """The "/"-joined paths of a parameter tree's leaves (a quantized node counts as one leaf)."""
    return [jax.tree_util.keystr(p, simple=True, separator="/")
            for p, _ in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_quantized)]


def int8_abstract(abstract: Any, trainable: str) -> Any:
    """The shapes (ShapeDtypeStructs, on their shardings) of a `frozen_int8` run's parameters, from the model's."""
    chosen = set(select_trainable(path_names(abstract), trainable))

    def layout(path, x):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if name in chosen or len(x.shape) < 2:
            return x
        axis = channel_axis(name, len(x.shape))
        sharding = getattr(x, "sharding", None)
        scale_shape = tuple(n if a == axis else 1 for a, n in enumerate(x.shape))
        return {"int8": jax.ShapeDtypeStruct(x.shape, jnp.int8, sharding=sharding),
                "scale": jax.ShapeDtypeStruct(scale_shape, jnp.float32, sharding=sharding)}

    return jax.tree_util.tree_map_with_path(layout, abstract)
