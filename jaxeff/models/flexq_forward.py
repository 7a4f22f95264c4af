"""Quantized projections in the forward pass, without changing a layer: the model's `apply` runs under a Flax method
interceptor that takes over each Dense / DenseGeneral whose kernel is quantized (FlexQ, jaxeff/models/flexq.py).

Two forms, one per class:
* `ActivationQuantized` (the reference): the kernel is already dequantized to float; the input is fake-quantized
  per token along the layer's contracted axes, then the layer runs as usual.
* `CodedServing` (what `jaxeff generate` runs): the kernel stays integer codes (int8) + scales in the params tree, in
  quant_matmul's serving layout (padded to whole groups and 128 columns when loaded); the layer's output is
  `pallas_kernels.quant_matmul` of its input (quantized per token inside the op:
  the Pallas kernel on GPU/TPU, the int32 XLA form on CPU) or, for weight-only schemes, the input times the kernel
  dequantized in the matmul. Equal to the reference up to the order of float32 sums.
Everything else (attention scores, norms, the head) stays float.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from jaxeff.models.flexq import fake_quant_activation
from pallas_kernels.quant_matmul import dequantize_rows, quant_matmul


def _n_contracted(module) -> int:
    axis = getattr(module, "axis", -1)  # nn.Dense contracts the last axis
    return len(axis) if isinstance(axis, (tuple, list)) else 1


def _quantized(context, table):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
        return None
    return table.get("/".join(module.path) + "/kernel")


def activation_interceptor(bits_of: dict[str, int], group_size: int):
    def intercept(next_fun, args, kwargs, context):
        bits = _quantized(context, bits_of)
        if bits is None:
            return next_fun(*args, **kwargs)
        x = fake_quant_activation(args[0], _n_contracted(context.module), bits, group_size)
        return next_fun(x, *args[1:], **kwargs)

    return intercept


def coded_interceptor(bits_of: dict[str, int | None], group_size: int):
    """`bits_of`: every coded kernel's name -> its activations' bits (None: float activations)."""
    def intercept(next_fun, args, kwargs, context):
        if _quantized(context, {n: True for n in bits_of}) is None:
            return next_fun(*args, **kwargs)
        module, x = context.module, args[0]
        node = module.variables["params"]["kernel"]
        codes_IO, scales_gO = node["codes"], node["scales"]
        n_in = _n_contracted(module)
        lead = x.shape[:x.ndim - n_in]
        x_NI = x.reshape(-1, math.prod(x.shape[x.ndim - n_in:]))
        bits = bits_of["/".join(module.path) + "/kernel"]
        features = module.features if isinstance(module.features, (tuple, list)) else (module.features,)
        n_out = math.prod(features)
        if bits is None:  # weight-only: the kernel dequantized inside the matmul's jit, never stored in float
            w_IO = dequantize_rows(codes_IO.T, scales_gO.T, group_size).T[:x_NI.shape[1], :n_out]
            y_NO = jnp.dot(x_NI.astype(jnp.float32), w_IO)
        else:  # the codes are in the serving layout (padded columns: dropped here)
            y_NO = quant_matmul(x_NI, codes_IO, scales_gO, group_size=group_size, act_bits=bits)[:, :n_out]
        y = y_NO.reshape(*lead, *features)
        if module.use_bias:
            y = y + module.variables["params"]["bias"]
        return y.astype(module.dtype or x.dtype)

    return intercept


class _Intercepted:
    """`model` with `apply` under an interceptor; every other attribute is the model's own."""

    def __init__(self, model: nn.Module, interceptor):
        self.model, self._interceptor = model, interceptor

    def apply(self, *args, **kwargs):
        with nn.intercept_methods(self._interceptor):
            return self.model.apply(*args, **kwargs)

    def __getattr__(self, name):  # only called for names not set in __init__
        if name in ("model", "_interceptor"):  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)


class ActivationQuantized(_Intercepted):
    def __init__(self, model: nn.Module, bits_of: dict[str, int], group_size: int):
        super().__init__(model, activation_interceptor(dict(bits_of), group_size))


class CodedServing(_Intercepted):
    def __init__(self, model: nn.Module, bits_of: dict[str, int | None], group_size: int):
        super().__init__(model, coded_interceptor(dict(bits_of), group_size))
