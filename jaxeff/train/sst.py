"""Sparse Spectral Training (SST, Zhao et al. 2025): the optimizer of the factorised matrices and the training hooks.

The parameterisation (which kernels, W = U diag(s) V^T, the gradients) is jaxeff/models/sst.py. Per factorised
matrix [m, n] with k = min(m, n) pairs and r = min(train.sst.rank, k) active ones, step t (from 0), learning rate
lr_t (the run's schedule), G = dL/dW:

    every resample_every steps:  draw r indices I without replacement, each draw proportional to s among the
                                 indices not drawn yet (Gumbel top-r of log s); the r Adam moments restart at zero
    every step, all i:           s_i <- max(s_i - lr_t * U_i^T G V_i, 0)
    every step, i in I:          U_i <- U_i - lr_t * adam(G V_i),   V_i <- V_i - lr_t * adam(G^T U_i)
                                 (Adam with b1, b2, eps of train.*, bias correction counted from the redraw,
                                 no weight decay), then U_i <- U_i / |U_i|,  V_i <- V_i / |V_i|
    every svd_every steps,       (after the update)  U, s, V <- SVD(U diag(s) V^T)  (thin, via two QRs and a
                                 k x k SVD), so U and V are orthonormal again
    i not in I:                  U_i, V_i unchanged (bitwise) between re-orthogonalisations

Optimizer state per matrix: the r indices and Adam moments of the r active columns of U and V ([m, r], [n, r]);
the sampler's key is a fixed function of the seed and the matrix, redrawn with the window number folded in, so
the state in the checkpoint (count, indices, moments) is all a resume needs. Departures from the paper: s takes a
plain gradient step (the equation above) where the paper's code hands s to the optimizer; the paper mixes the
sampling distribution with a uniform one (p_i = (1/k + s_i / sum s) / 2) where we sample proportional to s.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxeff.config import ConfigError, TrainConfig
from jaxeff.models.sst import factorise, is_factorised, materialise, selected_names
from jaxeff.models.stored_layout import StoredLayoutModel, boxed_init_params


class SstState(NamedTuple):
    count: jax.Array  # updates done
    matrices: tuple  # per factorised matrix (tree order): {"idx": [r], "mu_U", "nu_U": [m, r], "mu_V", "nu_V": [n, r]}


def _views(node):
    k = node["s"].shape[0]
    return node["U"].reshape(-1, k), node["s"], node["V"].reshape(-1, k)


def draw(key: jax.Array, s: jax.Array, r: int) -> jax.Array:
    """r distinct indices, successively drawn with probability proportional to s among those not drawn yet."""
    gumbel = jax.random.gumbel(key, s.shape, jnp.float32)
    return jax.lax.top_k(jnp.log(s.astype(jnp.float32)) + gumbel, r)[1].astype(jnp.int32)


def resvd(u: jax.Array, s: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The thin SVD of U diag(s) V^T ([m, k], [k], [n, k]) without forming the [m, n] matrix."""
    qu, ru = jnp.linalg.qr(u)
    qv, rv = jnp.linalg.qr(v)
    a, s_new, bt = jnp.linalg.svd((ru * s) @ rv.T)
    return qu @ a, s_new, qv @ bt.T


def _normalise(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=0, keepdims=True)


def sst(learning_rate: optax.ScalarOrSchedule, rank: int, resample_every: int, svd_every: int, seed: int,
        b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """The SST update (module docstring) of every factorised node {"U", "s", "V"} of the tree; other leaves pass
    through unchanged (with_sst gives them to the dense optimizer). The gradients are those of jaxeff.models.sst.materialise (without s_i)."""
    if resample_every < 1 or svd_every < 0 or (svd_every and svd_every % resample_every):
        raise ConfigError(f"train.sst.svd_every={svd_every} is not a multiple of train.sst.resample_every="
                          f"{resample_every}; a re-orthogonalisation must start a new draw (set svd_every to a "
                          "multiple, or 0)")
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
    base_key = jax.random.key(seed)

    def nodes(tree) -> list:
        return [x for x in jax.tree.leaves(tree, is_leaf=is_factorised) if is_factorised(x)]

    def key_of(j: int, window) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(base_key, j), window)

    def init(params):
        matrices = []
        for j, node in enumerate(nodes(params)):
            u, s, v = _views({name: getattr(x, "value", x) for name, x in node.items()})
            r = min(rank, s.shape[0])
            matrices.append({"idx": draw(key_of(j, 0), s, r),
                             "mu_U": jnp.zeros((u.shape[0], r), jnp.float32), "nu_U": jnp.zeros((u.shape[0], r), jnp.float32),
                             "mu_V": jnp.zeros((v.shape[0], r), jnp.float32), "nu_V": jnp.zeros((v.shape[0], r), jnp.float32)})
        return SstState(jnp.zeros((), jnp.int32), tuple(matrices))

    def update(grads, state: SstState, params=None):
        if params is None:
            raise ValueError("the SST update needs the parameters: tx.update(grads, state, params)")
        count = state.count
        lr = schedule(count)
        new_window = count % resample_every == 0
        t = (count % resample_every + 1).astype(jnp.float32)  # Adam steps since the draw
        reorthogonalise = (count + 1) % svd_every == 0 if svd_every else jnp.zeros((), bool)
        out_nodes, out_states = [], []
        for j, (node, grad, st) in enumerate(zip(nodes(params), nodes(grads), state.matrices)):
            u, s, v = _views(node)
            gu, gs, gv = _views(grad)
            r = st["idx"].shape[0]
            idx = jnp.where(new_window, draw(key_of(j, count // resample_every), s, r), st["idx"])
            keep = 1.0 - new_window.astype(jnp.float32)
            s_new = jnp.maximum(s - lr * gs, 0.0)

            def adam(x, g, mu, nu):
                mu = b1 * mu * keep + (1 - b1) * g
                nu = b2 * nu * keep + (1 - b2) * g * g
                step = (mu / (1 - b1 ** t)) / (jnp.sqrt(nu / (1 - b2 ** t)) + eps)
                return _normalise(x - lr * step), mu, nu

            ua, mu_u, nu_u = adam(u[:, idx], gu[:, idx], st["mu_U"], st["nu_U"])
            va, mu_v, nu_v = adam(v[:, idx], gv[:, idx], st["mu_V"], st["nu_V"])
            u_new, v_new = u.at[:, idx].set(ua), v.at[:, idx].set(va)
            u_new, s_new, v_new = jax.lax.cond(reorthogonalise, resvd, lambda *a: a, u_new, s_new, v_new)
            out_nodes.append({"U": (u_new - u).reshape(node["U"].shape), "s": s_new - s,
                              "V": (v_new - v).reshape(node["V"].shape)})
            out_states.append({"idx": idx, "mu_U": mu_u, "nu_U": nu_u, "mu_V": mu_v, "nu_V": nu_v})
        it = iter(out_nodes)
        updates = jax.tree.map(lambda x: next(it) if is_factorised(x) else x, grads, is_leaf=is_factorised)
        return updates, SstState(count + 1, tuple(out_states))

    return optax.GradientTransformation(init, update)


class WithSstState(NamedTuple):
    dense: Any  # the plain parameters' optimizer state (factorised nodes are None in its tree)
    sst: SstState


def _without_factors(tree):
    return jax.tree.map(lambda x: None if is_factorised(x) else x, tree, is_leaf=is_factorised)


def with_sst(dense: optax.GradientTransformation, cfg: TrainConfig,
             schedule: optax.Schedule) -> optax.GradientTransformation:
    """`dense` for the plain parameters, SST for the factorised ones (unchanged `dense` when train.sst.rank is 0).
    The factorised nodes are None in `dense`'s tree, so its state holds nothing for them."""
    if not cfg.sst.rank:
        return dense
    c = cfg.sst
    spectral = sst(schedule, c.rank, c.resample_every, c.svd_every, cfg.seed, cfg.b1, cfg.b2, cfg.eps)

    def init(params):
        return WithSstState(dense.init(_without_factors(params)), spectral.init(params))

    def update(grads, state: WithSstState, params=None):
        dense_updates, dense_state = dense.update(_without_factors(grads), state.dense, _without_factors(params))
        sst_updates, sst_state = spectral.update(grads, state.sst, params)
        plain = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(dense_updates)}
        updates = jax.tree_util.tree_map_with_path(
            lambda p, x: x if is_factorised(x) else plain[jax.tree_util.keystr(p)], sst_updates, is_leaf=is_factorised)
        return updates, WithSstState(dense_state, sst_state)

    return optax.GradientTransformation(init, update)


class SstModel(StoredLayoutModel):
    """A model whose parameters hold the selected kernels as factors: `init` factorises the model's fresh
    parameters, `apply` multiplies them back first."""

    def __init__(self, model, pattern: str, d_model: int):
        super().__init__(model)
        self.sst_pattern, self.sst_d_model = pattern, d_model  # prefixed: other names reach the wrapped model

    def stored_params(self, params, key):
        return factorise(params, self.sst_pattern, self.sst_d_model)

    def model_params(self, params):
        return materialise(params)


def sst_model(model, cfg, init_input) -> Any:
    """The run's model under `train.sst` (the model itself when rank is 0); ConfigError when the pattern selects
    no matrix."""
    c = cfg.train.sst
    if not c.rank:
        return model
    if not selected_names(boxed_init_params(model, init_input), c.layers):
        raise ConfigError(f"train.sst.layers={c.layers!r} matches no parameter matrix; use a pattern on paths such "
                          "as layer_0/mixer/q/kernel (the default selects every mixer's projections)")
    if c.svd_every and c.svd_every % c.resample_every:
        raise ConfigError(f"train.sst.svd_every={c.svd_every} is not a multiple of train.sst.resample_every="
                          f"{c.resample_every}; a re-orthogonalisation must start a new draw (set svd_every to a "
                          "multiple, or 0)")
    return SstModel(model, c.layers, cfg.model.d_model)


def factorise_params(params, cfg):
    """Plain parameters (train.init_from) in the run's factorised layout."""
    return factorise(params, cfg.train.sst.layers, cfg.model.d_model) if cfg.train.sst.rank else params
