"""A model whose quantized projections see activations fake-quantized per token (FlexQ's dynamic activations).

No layer changes: the model's `apply` runs under a Flax method interceptor that, for each Dense / DenseGeneral whose
kernel is in `bits_of` (parameter name -> activation bits), quantizes the input along the layer's contracted axes
(see jaxeff/models/flexq.py) before the matmul. Everything else (attention scores, norms, the head) stays float.
"""

from __future__ import annotations

import flax.linen as nn

from jaxeff.models.flexq import fake_quant_activation


def _n_contracted(module) -> int:
    axis = getattr(module, "axis", -1)  # nn.Dense contracts the last axis
    return len(axis) if isinstance(axis, (tuple, list)) else 1


def activation_interceptor(bits_of: dict[str, int], group_size: int):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
            return next_fun(*args, **kwargs)
        bits = bits_of.get("/".join(module.path) + "/kernel")
        if bits is None:
            return next_fun(*args, **kwargs)
        x = fake_quant_activation(args[0], _n_contracted(module), bits, group_size)
        return next_fun(x, *args[1:], **kwargs)

    return intercept


class ActivationQuantized:
    """`model` with `apply` under the activation interceptor; every other attribute is the model's own."""

    def __init__(self, model: nn.Module, bits_of: dict[str, int], group_size: int):
        self.model = model
        self.bits_of, self.group_size = dict(bits_of), group_size

    def apply(self, *args, **kwargs):
        with nn.intercept_methods(activation_interceptor(self.bits_of, self.group_size)):
            return self.model.apply(*args, **kwargs)

    def __getattr__(self, name):  # only called for names not set in __init__
        if name == "model":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)
