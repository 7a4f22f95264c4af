"""Quantized matrices in an export. The record's "kind" says which format: "ternary" (below) or "flexq" (b-bit codes
of `jaxeff quantize`, jaxeff/artifacts/packed_flexq.py); `packed_abstract` and `unpack_params` read either.

Ternary matrices: 2-bit codes packed 4 per byte plus float32 scales (`jaxeff export` of a QAT run).

In `params/`, a quantized parameter `.../kernel` of n elements becomes a dict
    .../kernel/codes   uint8 [ceil(n / 4)]: the tensor's values in row-major order, element 4i + j in bits 2j..2j+1
                       of byte i (code 0 -> 0, 1 -> +1, 2 -> -1; padding codes 0)
    .../kernel/scales  float32 [n / group_size] (one when group_size is 0): the scale of each group
and config.json records {"quantization": {"kind": "ternary", "group_size", "params": [names], "packing"}}. The value
of element k is code_k x scales[k // group_size] (scales[0] per tensor). Loading unpacks them to float32 matrices.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.artifacts.packed_flexq import KIND as FLEXQ, flexq_abstract, unpack_flexq
from jaxeff.config.qat import QatConfig
from jaxeff.models.qat import dequantize, param_name, quantized_names

PACKING = "2-bit codes, 4 per byte, element 4i+j in bits 2j..2j+1 of byte i; 0 -> 0, 1 -> +1, 2 -> -1"
_VALUE_OF_CODE = np.array([0, 1, -1, 0], np.int8)  # code 3 is never written


def pack_codes(codes) -> np.ndarray:
    """Ternary codes (any shape, values -1/0/1) -> uint8 [ceil(n / 4)]."""
    flat = np.asarray(codes).reshape(-1).astype(np.int8)
    if not np.all(np.abs(flat) <= 1):
        raise ValueError("pack_codes: values outside {-1, 0, 1}")
    two_bits = np.where(flat < 0, 2, flat).astype(np.uint8)
    two_bits = np.pad(two_bits, (0, -len(two_bits) % 4)).reshape(-1, 4)
    return (two_bits[:, 0] | two_bits[:, 1] << 2 | two_bits[:, 2] << 4 | two_bits[:, 3] << 6).astype(np.uint8)


def unpack_codes(packed, n: int):
    """uint8 [ceil(n / 4)] -> int8 [n] in {-1, 0, 1} (jnp: runs on the device the bytes are on)."""
    two_bits = (jnp.asarray(packed)[:, None] >> jnp.array([0, 2, 4, 6], jnp.uint8)) & 3
    return jnp.asarray(_VALUE_OF_CODE)[two_bits.reshape(-1)[:n].astype(jnp.int32)]


def _codes_and_scales(q, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes and scales of already-quantized values (each group in {-s, 0, s}): sign and max |q| per group.
    Exact: unpacking gives q back bit for bit (an all-zero group gets scale 0)."""
    q = np.asarray(q, np.float32)
    q_GN = q.reshape(1, -1) if group_size == 0 else q.reshape(-1, group_size)
    scales = np.abs(q_GN).max(axis=1)
    if not np.all((np.abs(q_GN) == scales[:, None]) | (q_GN == 0)):
        raise ValueError("not ternary values: pack the quantized parameters (Trained.run_params)")
    return np.sign(q_GN).astype(np.int8).reshape(q.shape), scales


def pack_params(quantized_params, qcfg: QatConfig) -> tuple[Any, dict]:
    """(the params tree with every quantized matrix as {"codes", "scales"}, the config.json record)."""
    names = quantized_names(quantized_params, qcfg)

    def one(path, x):
        if param_name(path) not in names:
            return np.asarray(x)
        codes, scales = _codes_and_scales(x, qcfg.group_size)
        return {"codes": pack_codes(codes), "scales": scales}

    packed = jax.tree_util.tree_map_with_path(one, quantized_params)
    return packed, {"kind": qcfg.kind, "group_size": qcfg.group_size, "params": names, "packing": PACKING}


def packed_abstract(abstract_params, record: dict) -> Any:
    """The shapes of an export's packed params/ tree, from the model's float shapes and the record."""
    if record.get("kind") == FLEXQ:
        return flexq_abstract(abstract_params, record)
    names, group_size = set(record["params"]), record["group_size"]

    def one(path, a):
        if param_name(path) not in names:
            return a
        n = math.prod(a.shape)
        return {"codes": jax.ShapeDtypeStruct((-(-n // 4),), np.uint8, sharding=a.sharding),
                "scales": jax.ShapeDtypeStruct((n // group_size if group_size else 1,), np.float32,
                                               sharding=a.sharding)}

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def unpack_params(packed, abstract_params, record: dict) -> Any:
    """The float32 params tree of a packed export: every quantized matrix code x scale, in its model shape."""
    if record.get("kind") == FLEXQ:
        return unpack_flexq(packed, abstract_params, record)
    names, group_size = set(record["params"]), record["group_size"]

    def one(path, a):
        node = _subtree(packed, path)
        if param_name(path) not in names:
            return node
        codes = unpack_codes(node["codes"], math.prod(a.shape)).reshape(a.shape)
        return dequantize(codes, jnp.asarray(node["scales"]), group_size)

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def _subtree(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def qat_of_record(record: dict) -> QatConfig:
    """The QatConfig that selects exactly the recorded parameters (none for a FlexQ export: not a training setting)."""
    if record.get("kind") == FLEXQ:
        return QatConfig()
    return QatConfig(kind=record["kind"], group_size=record["group_size"], params=list(record["params"]),
                     keep_float=[])
