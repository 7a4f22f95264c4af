"""A model whose parameters are stored in another layout than the one it runs with (Sparse Spectral Training's
factors, LoRA's frozen base plus adapters): the wrapper converts at `init` and back at `apply`, and is the wrapped
model in every other respect (its config, its methods), so the task code never knows."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


class StoredLayoutModel:
    """Subclasses say how fresh parameters are stored (`stored_params`) and how a forward pass runs from them
    (`apply`; by default the wrapped model on `model_params` of the stored tree)."""

    def __init__(self, model):
        self.wrapped = model

    def stored_params(self, params: Any, key) -> Any:
        raise NotImplementedError

    def model_params(self, params: Any) -> Any:
        raise NotImplementedError

    def init(self, key, *args, **kwargs):
        variables = self.wrapped.init(key, *args, **kwargs)
        return {**variables, "params": self.stored_params(variables["params"], key)}

    def apply(self, variables, *args, **kwargs):
        return self.wrapped.apply({**variables, "params": self.model_params(variables["params"])}, *args, **kwargs)

    def __getattr__(self, name):
        if name == "wrapped":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)


def boxed_init_params(model, init_input: jax.ShapeDtypeStruct) -> Any:
    """The shapes of `model`'s fresh parameters, boxed in their logical axis names (nothing allocated): what a
    method checks its selection of matrices against."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(init_input.shape, init_input.dtype)))
    return variables["params"]
