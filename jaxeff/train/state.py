"""Train state as a plain dict pytree, its shardings, and sharded initialisation.

state = {"step": int32[], "params": ..., "opt_state": ..., "rng": uint32[2]}. A plain dict keeps
Orbax checkpoints readable without jaxeff. `init_input` is a batch-of-one model input (its shape and
dtype: the task's `init_input`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxeff.parallel.sharding import logical_shardings
from jaxeff.train.zo import ZoOptimizer


def _boxed_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, init_input: jax.ShapeDtypeStruct):
    init_key, train_key = jax.random.split(jax.random.key(seed))
    params = model.init(init_key, jnp.zeros(init_input.shape, init_input.dtype))["params"]
    return {"step": jnp.zeros((), jnp.int32), **_params_and_optimizer(tx, params),
            "rng": jax.random.key_data(train_key)}


def _params_and_optimizer(tx, params) -> dict[str, Any]:
    """{"params", "opt_state"}; the zeroth-order optimizer keeps its own layout (jaxeff/train/zo.py)."""
    if isinstance(tx, ZoOptimizer):
        return tx.init_state(params)
    return {"params": params, "opt_state": tx.init(params)}


def abstract_state_and_shardings(model, tx, mesh: Mesh, seed: int, init_input: jax.ShapeDtypeStruct) -> tuple[Any, Any]:
    """Shapes (unboxed ShapeDtypeStructs) and NamedShardings of the train state, without allocating it."""
    boxed = abstract_boxed_state(model, tx, seed, init_input)
    shardings = logical_shardings(mesh, boxed)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)
    return abstract, shardings


def abstract_boxed_state(model, tx, seed: int, init_input: jax.ShapeDtypeStruct):
    """The state's shapes with parameters still boxed in their logical axis names."""
    return jax.eval_shape(lambda: _boxed_state(model, tx, seed, init_input))


def logical_axes(boxed_params) -> Any:
    """Tree of logical axis-name tuples, one per parameter."""
    def names(b):  # parameters declared without logical names are replicated
        return tuple(b.names) if isinstance(b, nn.LogicallyPartitioned) else (None,) * len(b.shape)

    return jax.tree.map(names, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def init_state(model, tx, shardings, seed: int, init_input: jax.ShapeDtypeStruct):
    """Create the state directly in its sharded layout (no full copy on one device first)."""
    init = jax.jit(lambda: nn.meta.unbox(_boxed_state(model, tx, seed, init_input)), out_shardings=shardings)
    return init()


def init_params(model, param_shardings, seed: int, init_input: jax.ShapeDtypeStruct):
    """Fresh parameters only (the values init_state gives them), in their sharded layout."""
    init = jax.jit(lambda: nn.meta.unbox(_boxed_state(model, optax.identity(), seed, init_input)["params"]),
                   out_shardings=param_shardings)
    return init()


def init_state_from_params(params, tx, shardings, seed: int):
    """A new train state (step 0, fresh optimizer) around given parameters: fine-tuning an import or export."""
    _, train_key = jax.random.split(jax.random.key(seed))

    def make(p):
        p = jax.tree.map(lambda x: x.astype(jnp.float32), p)
        return {"step": jnp.zeros((), jnp.int32), **_params_and_optimizer(tx, p), "rng": jax.random.key_data(train_key)}

    return jax.jit(make, out_shardings=shardings)(params)
