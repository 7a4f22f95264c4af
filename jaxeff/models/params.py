"""Parameter trees without allocating them: shapes for restoring checkpoints and exports, and counts."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def abstract_params(model: nn.Module, model_input: jax.ShapeDtypeStruct, sharding=None) -> Any:
    """ShapeDtypeStructs of `model.init(key, input)["params"]` (logical-axis boxes removed), placed on `sharding`
    (default: the first device) so that Orbax restores into it."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(model_input.shape, model_input.dtype))["params"])
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), nn.meta.unbox(boxed))


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
