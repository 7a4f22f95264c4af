"""FlexQ-quantized matrices in an export (`jaxeff quantize`): b-bit codes packed densely plus float32 scales.

In `params/`, a quantized kernel of shape in_shape + out_shape (viewed as W_IO, I = prod(in_shape)) becomes
    .../kernel/codes   the codes of W_IO in row-major order, packed (jaxeff/artifacts/bitpack.py)
    .../kernel/scales  float32 [ceil(I / G), O]: the scale of each group of G inputs of each output
and config.json records {"quantization": {"kind": "flexq", "scheme", "weight_bits", "activation_bits",
"group_size", "a8_layers", "params": {name: {"input_axes", "activation_bits"}}, "packing"}}. Element (i, o) is
codes[i, o] x scales[i // G, o] (jaxeff/models/flexq.py). Loading unpacks them to float32 kernels; the activation
bits of each kernel's input go to the model's forward (jaxeff/models/flexq_forward.py), which serves the kernels
as int8 codes + scales through the quantized matmul.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from jaxeff.artifacts import bitpack
from jaxeff.models.flexq import Scheme, dequantize_kernel, matches, quantize_params
from pallas_kernels.quant_matmul import serving_layout

KIND = "flexq"


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def pack_flexq(params, scheme: Scheme, group_size: int, a8_layers: list[str], d_model: int) -> tuple[Any, dict]:
    """(the float params tree with every quantized kernel packed, the config.json record)."""
    quantized, n_in = quantize_params(params, scheme, group_size, d_model)
    packed = jax.tree.map(lambda x: np.asarray(x), quantized)
    for name in n_in:
        node = _subtree(packed, name.split("/"))
        node["codes"] = bitpack.pack(node["codes"], scheme.weight_bits)
    return packed, flexq_record(n_in, scheme, group_size, a8_layers)


def flexq_record(n_in: dict[str, int], scheme: Scheme, group_size: int, a8_layers: list[str]) -> dict:
    """The config.json record of kernels `n_in` ({name: input axes}) quantized under `scheme`."""
    a_bits = scheme.activation_bits
    return {"kind": KIND, "scheme": scheme.name, "weight_bits": scheme.weight_bits, "activation_bits": a_bits,
            "group_size": group_size, "a8_layers": list(a8_layers),
            "params": {n: {"input_axes": k,
                           "activation_bits": a_bits if a_bits is None or not matches(n, a8_layers)
                           else max(a_bits, 8)}
                       for n, k in n_in.items()},
            "packing": bitpack.PACKING[scheme.weight_bits]}


def _subtree(tree, keys):
    for key in keys:
        tree = tree[key]
    return tree


def _io(shape, n_in: int) -> tuple[int, int]:
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def flexq_abstract(abstract_params, record: dict) -> Any:
    """The shapes of a FlexQ export's params/ tree, from the model's float shapes and the record."""
    entries, bits, g = record["params"], record["weight_bits"], record["group_size"]

    def one(path, a):
        if _name(path) not in entries:
            return a
        i, o = _io(a.shape, entries[_name(path)]["input_axes"])
        return {"codes": jax.ShapeDtypeStruct((bitpack.packed_size(i * o, bits),), np.int8 if bits == 8 else np.uint8,
                                              sharding=a.sharding),
                "scales": jax.ShapeDtypeStruct((-(-i // g), o), np.float32, sharding=a.sharding)}

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def unpack_flexq(packed, abstract_params, record: dict, dequantize: bool = True) -> Any:
    """The float32 params tree of a FlexQ export: every quantized kernel codes x scales, in its model shape. With
    `dequantize=False` (serving) each stays {"codes": int8, "scales": float32} in quant_matmul's serving layout
    ([nG G, Op] and [nG, Op]: zero rows to whole groups, zero columns to a multiple of 128)."""
    entries, bits, g = record["params"], record["weight_bits"], record["group_size"]

    def one(path, a):
        node = _subtree(packed, [k.key for k in path])
        if _name(path) not in entries:
            return node
        i, o = _io(a.shape, entries[_name(path)]["input_axes"])
        codes_IO = bitpack.unpack(node["codes"], bits, i * o).reshape(i, o)
        if not dequantize:  # padded once here, so that no matmul pads (copies) the weight per call
            codes, scales = serving_layout(codes_IO.astype(np.int8), np.asarray(node["scales"]), g)
            return {"codes": codes, "scales": scales}
        return dequantize_kernel(codes_IO, node["scales"], a.shape, g)

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def activation_bits_of(record: dict) -> dict[str, int | None]:
    """{quantized kernel name: bits of its input's per-token quantization, None for float activations}."""
    return {n: e["activation_bits"] for n, e in record["params"].items()}
