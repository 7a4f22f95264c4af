"""LoRA's parameterisation (Hu et al. 2021): a selected kernel W is stored as {"base": W, "lora_A": A, "lora_B": B}
and the model runs with

    W' = W + (alpha / r) A B^T        A: in_shape + (r,)    B: out_shape + (r,)

where the kernel's shape is in_shape + out_shape, viewed as the [m, n] matrix of jaxeff/models/sst.py (the same
split of input and output axes, so A and B keep the kernel's own axes and their logical names). At the start B = 0
and A is uniform in +-1/sqrt(m) (PEFT's default, Kaiming-uniform with a = sqrt(5)), so W' = W exactly: a run
initialised from a trained model starts from that model's outputs.

`merge` gives the model's own tree (W' in place of each node); the base and, with `freeze: all`, every other
parameter that is not an adapter pass through `stop_gradient`, so the backward pass never forms their gradients.
The training side (the model wrapper, the optimizer that leaves frozen parameters alone) is jaxeff/train/lora.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxeff.models.sst import input_axes, is_selected, path_name, value_of

ADAPTER_KEYS = ("lora_A", "lora_B")
ADAPTED_KEYS = frozenset({"base", *ADAPTER_KEYS})


def is_adapted(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node.keys()) == ADAPTED_KEYS


def is_adapter(name: str) -> bool:
    """Whether a parameter path ("layer_0/mixer/q/kernel/lora_A") names an adapter matrix."""
    return name.rsplit("/", 1)[-1] in ADAPTER_KEYS


def trains(name: str, freeze: str) -> bool:
    """Whether the parameter at `name` trains under `train.lora.freeze` (adapters always, bases never)."""
    last = name.rsplit("/", 1)[-1]
    return last in ADAPTER_KEYS or (freeze == "adapted" and last != "base")


def adapter_matrices(kernel_shape: tuple[int, ...], rank: int, d_model: int, key: jax.Array) -> dict[str, jax.Array]:
    """Fresh A (uniform in +-1/sqrt(m)) and B (zeros) for a kernel of `kernel_shape`; r is capped at min(m, n)."""
    a = input_axes(kernel_shape, d_model)
    in_shape, out_shape = kernel_shape[:a], kernel_shape[a:]
    m, n = math.prod(in_shape), math.prod(out_shape)
    r = min(rank, m, n)
    bound = 1.0 / math.sqrt(m)
    return {"lora_A": jax.random.uniform(key, (*in_shape, r), jnp.float32, -bound, bound),
            "lora_B": jnp.zeros((*out_shape, r), jnp.float32)}


def adapt(params, pattern: str, rank: int, d_model: int, key: jax.Array):
    """The parameter tree with every selected kernel replaced by {"base", "lora_A", "lora_B"}; matrix j (tree order)
    draws its A from fold_in(key, j). Boxed kernels give boxed nodes: A and B keep the kernel's input and output axis
    names, the rank axis is replicated."""
    counter = iter(range(1 << 30))

    def one(path, x):
        shape = tuple(jnp.shape(value_of(x)))
        if not is_selected(path_name(path), shape, pattern):
            return x
        new = adapter_matrices(shape, rank, d_model, jax.random.fold_in(key, next(counter)))
        if not isinstance(x, nn.LogicallyPartitioned):
            return {"base": x, **new}
        a = new["lora_A"].ndim - 1
        return {"base": x,
                "lora_A": nn.LogicallyPartitioned(new["lora_A"], (*x.names[:a], None)),
                "lora_B": nn.LogicallyPartitioned(new["lora_B"], (*x.names[a:], None))}

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def merged_matrix(node: Mapping[str, jax.Array], scale: float) -> jax.Array:
    """W + scale A B^T in the kernel's own shape and dtype; no gradient reaches W."""
    base, a, b = node["base"], node["lora_A"], node["lora_B"]
    r = a.shape[-1]
    delta = a.reshape(-1, r) @ b.reshape(-1, r).T
    return (jax.lax.stop_gradient(base) + scale * delta.reshape(base.shape)).astype(base.dtype)


def merge(params, scale: float, freeze: str = "all"):
    """The model's own tree: every adapted node merged (W' = W + scale A B^T); with `freeze: all` every other
    parameter behind stop_gradient too, so a backward pass forms gradients for the adapters only."""
    def one(x):
        if is_adapted(x):
            return merged_matrix(x, scale)
        return jax.lax.stop_gradient(x) if freeze == "all" else x

    return jax.tree.map(one, params, is_leaf=is_adapted)


def scale_of(lora_cfg) -> float:
    """alpha / r, the adapters' output scale."""
    return lora_cfg.alpha / lora_cfg.rank


def adapted_abstract(abstract, pattern: str, rank: int, d_model: int):
    """ShapeDtypeStructs of the adapted tree of a plain abstract tree, on the plain leaves' shardings."""
    shapes = jax.eval_shape(lambda p: adapt(p, pattern, rank, d_model, jax.random.key(0)), abstract)
    sharding = getattr(jax.tree.leaves(abstract)[0], "sharding", None)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)


def merged_abstract(params):
    """ShapeDtypeStructs of the model's own tree (the kernels' shapes) of an adapted one."""
    return jax.eval_shape(lambda p: merge(p, 1.0), params)
