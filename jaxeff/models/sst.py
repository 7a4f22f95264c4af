"""Sparse Spectral Training's parameterisation: selected matrices stored as {"U", "s", "V"}, W = U diag(s) V^T.

A kernel W of shape in_shape + out_shape (a Dense [D, F], a DenseGeneral [D, H, K] or [H, K, D]) is viewed as the
2-D matrix [m, n], m = prod(in_shape), n = prod(out_shape); the input axes are the first one when it is d_model
wide, else all but the last (which is then d_model wide). Its factors keep the kernel's own axes:

    U: in_shape + (k,)    s: (k,)    V: out_shape + (k,)        k = min(m, n)

from the SVD of the kernel (thin, so W is represented exactly). `materialise` multiplies them back before the
model runs; its backward pass gives the gradients SST uses (G = dL/dW viewed as [m, n]):

    U_i: G V_i          s_i: U_i^T G V_i          V_i: G^T U_i

i.e. the true gradients of U and V without the factor s_i (the paper's "enhanced" gradient), so the optimizer in
jaxeff/train/sst.py gets them directly. The training side (which pairs move, the update rule) is in that module.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

FACTOR_KEYS = frozenset({"U", "s", "V"})


def is_factorised(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node.keys()) == FACTOR_KEYS


def path_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def input_axes(shape: tuple[int, ...], d_model: int) -> int:
    """How many leading axes of a kernel are its input axes (see the module docstring)."""
    return 1 if shape[0] == d_model or shape[-1] != d_model else len(shape) - 1


def is_selected(name: str, shape: tuple[int, ...], pattern: str) -> bool:
    """Whether `pattern` selects the parameter at path `name` (a matrix: two or more axes)."""
    return len(shape) >= 2 and re.search(pattern, name) is not None


def selected_names(params, pattern: str) -> list[str]:
    """Paths of the (plain or boxed) matrices that `pattern` selects (SST's factorised, LoRA's adapted ones)."""
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return [path_name(p) for p, x in leaves if is_selected(path_name(p), tuple(jnp.shape(value_of(x))), pattern)]


def value_of(x):
    return x.value if isinstance(x, nn.LogicallyPartitioned) else x


def factorise_matrix(kernel: jax.Array, d_model: int) -> dict[str, jax.Array]:
    shape = kernel.shape
    a = input_axes(shape, d_model)
    in_shape, out_shape = shape[:a], shape[a:]
    u, s, vt = jnp.linalg.svd(kernel.reshape(math.prod(in_shape), math.prod(out_shape)).astype(jnp.float32),
                              full_matrices=False)
    k = s.shape[0]
    return {"U": u.reshape(*in_shape, k), "s": s, "V": vt.T.reshape(*out_shape, k)}


def factorise(params, pattern: str, d_model: int):
    """The parameter tree with every selected kernel replaced by its factors. Boxed (logically partitioned)
    kernels give boxed factors: U and V keep the kernel's axis names, the rank axis is replicated."""
    def one(path, x):
        if not is_selected(path_name(path), tuple(jnp.shape(value_of(x))), pattern):
            return x
        if not isinstance(x, nn.LogicallyPartitioned):
            return factorise_matrix(x, d_model)
        f = factorise_matrix(x.value, d_model)
        a = f["U"].ndim - 1
        return {"U": x.replace_boxed(f["U"]).replace(names=(*x.names[:a], None)),
                "s": x.replace_boxed(f["s"]).replace(names=(None,)),
                "V": x.replace_boxed(f["V"]).replace(names=(*x.names[a:], None))}

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@jax.custom_vjp
def _product(u, s, v):
    return (u * s) @ v.T


def _product_fwd(u, s, v):
    return _product(u, s, v), (u, v)


def _product_bwd(res, g):
    u, v = res
    gv = g @ v  # [m, k]: G V_i
    return gv, jnp.sum(u * gv, axis=0), g.T @ u


_product.defvjp(_product_fwd, _product_bwd)


def materialise_matrix(node: Mapping[str, jax.Array]) -> jax.Array:
    """W = U diag(s) V^T in the kernel's own shape, with SST's gradients (module docstring)."""
    u, s, v = node["U"], node["s"], node["V"]
    in_shape, out_shape, k = u.shape[:-1], v.shape[:-1], s.shape[0]
    w = _product(u.reshape(-1, k), s, v.reshape(-1, k))
    return w.reshape(*in_shape, *out_shape)


def materialise(params):
    """Plain parameters: every factorised matrix multiplied back (an ordinary model's tree)."""
    return jax.tree.map(lambda x: materialise_matrix(x) if is_factorised(x) else x, params, is_leaf=is_factorised)


def factorised_abstract(abstract, pattern: str, d_model: int):
    """ShapeDtypeStructs of the factorised tree of a plain abstract tree, on the plain leaves' shardings."""
    shapes = jax.eval_shape(lambda p: factorise(p, pattern, d_model), abstract)
    sharding = getattr(jax.tree.leaves(abstract)[0], "sharding", None)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)


def plain_abstract(params):
    """ShapeDtypeStructs of the plain tree of a factorised one (the kernels' shapes)."""
    return jax.eval_shape(materialise, params)
