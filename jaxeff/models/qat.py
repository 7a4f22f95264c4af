"""Ternary quantization-aware training (`train.qat`): a transformation of the parameter tree.

The model never knows: the loss sees `quantize(params)`, where every selected matrix W is replaced by its ternary
version (BitNet b1.58's absmean quantizer, per tensor or per group of `group_size` consecutive elements):

    gamma = max(mean(|W_g|), EPS)                      one scale per group g (the whole tensor when group_size = 0)
    Q(W)_g = clip(round(W_g / gamma), -1, 1) * gamma   values in {-gamma, 0, +gamma}

and the straight-through estimator makes the gradient with respect to W the identity (also beyond the clip, and
none through gamma): the forward value is exactly Q(W), so an export that stores the ternary codes and the scales
reproduces the training forward bit for bit. See docs/methods/qat.md.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxeff.config import ConfigError
from jaxeff.config.qat import QatConfig

EPS = 1e-5  # the scale's floor, as in BitNet's released code (mean |W| clamped from below)


def param_name(path) -> str:
    """'layer_0/mixer/q/kernel': a parameter's path in the tree, joined with '/'."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantized_names(params, qcfg: QatConfig) -> list[str]:
    """The parameters `qcfg` quantizes in this tree (arrays or shapes), in tree order; ConfigError when none is
    selected, when a selected one is not a matrix, or when the group size does not divide one of them."""
    leaves = {param_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    names = [n for n in leaves if _matches(n, qcfg.params) and not _matches(n, qcfg.keep_float)]
    if not names:
        matrices = [n for n, x in leaves.items() if len(x.shape) >= 2][:4]
        raise ConfigError(f"train.qat.kind={qcfg.kind}: no parameter of this model matches train.qat.params="
                          f"{qcfg.params} (less train.qat.keep_float); list the matrices to quantize, e.g. {matrices}")
    for n in names:
        if len(leaves[n].shape) < 2:
            raise ConfigError(f"train.qat.params matches {n} of shape {tuple(leaves[n].shape)}, not a matrix; "
                              "ternary quantization is for matrices: narrow the pattern or add it to "
                              "train.qat.keep_float")
    g = qcfg.group_size
    sizes = {n: math.prod(leaves[n].shape) for n in names}
    bad = [n for n in names if g and sizes[n] % g]
    if bad:
        common = math.gcd(*sizes.values())
        fits = [d for d in (2**k for k in range(4, 13)) if common % d == 0] or [common]
        raise ConfigError(f"train.qat.group_size={g} does not divide {bad[0]} ({sizes[bad[0]]} elements); pick one "
                          f"that divides every quantized matrix, e.g. {fits}, or 0 for one scale per tensor")
    return names


def _groups(w, group_size: int):
    """[G, n]: the tensor in row-major order cut into groups (one group: the whole tensor)."""
    return w.reshape(1, -1) if group_size == 0 else w.reshape(-1, group_size)


def ternary_codes(w, group_size: int):
    """(codes in {-1, 0, 1} as float32 in w's shape, scales float32 [groups]) of the absmean quantizer."""
    w_GN = _groups(w.astype(jnp.float32), group_size)
    gamma_G = jnp.maximum(jnp.mean(jnp.abs(w_GN), axis=1), EPS)
    codes_GN = jnp.clip(jnp.round(w_GN / gamma_G[:, None]), -1, 1)
    return codes_GN.reshape(w.shape), gamma_G


def dequantize(codes, scales, group_size: int):
    """codes x their group's scale, float32 in the codes' shape (the inverse of `ternary_codes` up to rounding)."""
    shape = codes.shape
    return (_groups(codes.astype(jnp.float32), group_size) * scales[:, None]).reshape(shape)


def ternary(w, group_size: int):
    """Q(W): the ternary values times their scales, float32."""
    return dequantize(*ternary_codes(w, group_size), group_size)


def straight_through(w, q):
    """Forward value exactly q; gradient with respect to w the identity (w - stop_gradient(w) is exactly 0)."""
    return jax.lax.stop_gradient(q) + (w - jax.lax.stop_gradient(w))


def param_quantizer(qcfg: QatConfig, params_like) -> Callable[[Any], Any]:
    """params -> params with the selected matrices fake-quantized (straight-through gradients); the identity when
    `qcfg.kind` is none. `params_like` (arrays or shapes of the tree) is checked now, once."""
    if not qcfg.enabled:
        return lambda params: params
    selected, group_size = frozenset(quantized_names(params_like, qcfg)), qcfg.group_size

    def one(path, w):
        return straight_through(w, ternary(w, group_size)) if param_name(path) in selected else w

    return lambda params: jax.tree_util.tree_map_with_path(one, params)


def on_quantized_params(fn: Callable, quantize: Callable[[Any], Any]) -> Callable:
    """fn(params, *rest) evaluated at quantize(params): a task's loss or metrics under QAT."""
    return lambda params, *rest: fn(quantize(params), *rest)


def qat_notes(qcfg: QatConfig, params_like) -> list[str]:
    """The header line of a QAT run: what is quantized, and how much of the model that is."""
    if not qcfg.enabled:
        return []
    names = set(quantized_names(params_like, qcfg))
    sizes = {param_name(p): math.prod(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params_like)}
    share = sum(sizes[n] for n in names) / sum(sizes.values())
    scales = "one scale per matrix" if not qcfg.group_size else f"one scale per {qcfg.group_size} elements"
    return [f"train.qat: {qcfg.kind} weights in {len(names)} matrices ({share:.0%} of the parameters; {scales}), "
            "straight-through gradients; evaluation and the sample use the quantized weights"]
