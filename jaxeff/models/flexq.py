"""FlexQ-style post-training quantization: the schemes and the quantizer of weights and activations.

Symmetric round-to-nearest with one scale per group of G consecutive elements along a matrix's *input* dimension
(a kernel [in_shape + out_shape] is viewed as W_IO, I = prod(in_shape), groups run down I for each output column;
an activation x [..., I] is grouped along I for each token). For b bits, qmax = 2^(b-1) - 1:

    s_g    = clip(max_{i in g} |v_i| / qmax, 1e-5, 1e4)        float32, the floor keeps an all-zero group finite
    code_i = clip(round_half_even(v_i / s_g), -2^(b-1), qmax)   an integer in b bits
    Q(v)_i = code_i * s_g

as FlexQ's released quantizer computes it with `--symmetric` (which turns the zero point off): its clamp bounds,
its scale clamp, its round-half-to-even. A ragged last group (I not a multiple of G) is the remaining I mod G
elements (FlexQ pads with zeros, which changes neither the max nor the codes). See docs/serving/quantize.md.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math

import jax
import jax.numpy as jnp

# The quantizer itself is the kernels' (one definition for the export, the forward and the matmul op).
from pallas_kernels.quant_matmul.reference import dequantize_rows, quantize_rows


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    weight_bits: int
    activation_bits: int | None  # None: activations stay in float (weight-only)


SCHEMES = {s.name: s for s in (Scheme("w6a6", 6, 6), Scheme("w6a8", 6, 8), Scheme("w8a8", 8, 8),
                               Scheme("w4a16", 4, None))}
# FlexQ's released choice for LLaMA: the MLP down projection keeps 8-bit activations under W6A6.
DEFAULT_A8_LAYERS = ["layer_*/channel/down/kernel"]
# The projection matrices of the token and channel mixers (Dense / DenseGeneral kernels); the embedding, the head,
# norms, MoE experts (plain parameters, no Dense) and mLSTM's float32 gates stay in float.
QUANTIZED = ["layer_*/mixer/*/kernel", "layer_*/channel/*/kernel"]
KEEP_FLOAT = ["*/igate/kernel", "*/fgate/kernel"]


def matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantized_names(names, patterns=QUANTIZED, keep_float=KEEP_FLOAT) -> list[str]:
    return [n for n in names if matches(n, patterns) and not matches(n, keep_float)]


def input_axes(shape: tuple[int, ...], d_model: int) -> int:
    """How many leading axes of a kernel are contracted with the input: the first when it is d_model wide (or the
    last is not), else all but the last (an output projection [H, K, D])."""
    return 1 if shape[0] == d_model or shape[-1] != d_model else len(shape) - 1


def quantize_kernel(w, n_in: int, bits: int, group_size: int):
    """A kernel [in_shape + out_shape] -> (codes int32 [I, O], scales float32 [nG, O]); groups down I."""
    w_IO = w.reshape(math.prod(w.shape[:n_in]), -1)
    codes_OI, s_Og = quantize_rows(w_IO.T, bits, group_size)
    return codes_OI.T, s_Og.T


def dequantize_kernel(codes_IO, s_gO, shape, group_size: int):
    """The float32 kernel in its model `shape` from its codes [I, O] and scales [nG, O]."""
    return dequantize_rows(codes_IO.T, s_gO.T, group_size).T.reshape(shape)


def fake_quant_weight(w, n_in: int, bits: int, group_size: int):
    return dequantize_kernel(*quantize_kernel(w, n_in, bits, group_size), w.shape, group_size)


def fake_quant_activation(x, n_in: int, bits: int, group_size: int):
    """x [..., in_shape] quantized per token, per group of G along its flattened last `n_in` axes; x's dtype."""
    lead, tail = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
    x_NI = x.reshape(-1, math.prod(tail))
    q_NI = dequantize_rows(*quantize_rows(x_NI, bits, group_size), group_size)
    return q_NI.reshape(*lead, *tail).astype(x.dtype)


def quantize_params(params, scheme: Scheme, group_size: int, d_model: int):
    """(the params tree with every quantized kernel as {"codes": int32 [I, O], "scales": [nG, O]}, {name: n_in})."""
    names = set(quantized_names(jax.tree_util.keystr(p, simple=True, separator="/")
                                for p, _ in jax.tree_util.tree_leaves_with_path(params)))
    n_in = {}

    def one(path, w):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if name not in names:
            return w
        n_in[name] = input_axes(tuple(w.shape), d_model)
        codes, scales = quantize_kernel(jnp.asarray(w), n_in[name], scheme.weight_bits, group_size)
        return {"codes": codes, "scales": scales}

    return jax.tree_util.tree_map_with_path(one, params), n_in
