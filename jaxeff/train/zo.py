"""Zeroth-order optimizer (`train.optimizer: zo`, after ZOODiP, Seo et al. 2025): no backward pass at all.

Notation: theta the trainable parameters (the leaves `train.zo.trainable` selects, all of them together a vector of
d numbers), L the training loss of the step's batch, n = `probes`, eps = `eps`, tau = `subspace_every`, nu =
`variance_threshold`. One train step (one compiled program, n + 1 forward passes):

    z_i        ~ N(0, I_d), i = 0..n-1; leaf j of z_i is  normal(fold_in(fold_in(key, i), j))  where key is the
                 step's key from the state's rng and j the leaf's index in jax.tree order (sorted paths): z_i is
                 regenerated from (key, i), never stored, and never more than one probe exists at a time
    g_i        = (L(theta + eps z_i) - L(theta)) / eps
    g          = sum_i g_i z_i / (sqrt((d' + n - 1) / n) n)          d' = d - k (k: directions projected off)
    g          <- g - sum_{j in R} (v_j . g) v_j                     (subspace gradient, once tau steps have run)
    theta      <- AdamW step with g as the gradient                  (train.* b1, b2, eps, weight decay, clipping,
                                                                      learning-rate schedule, non-finite guard)

E[g_i z_i] -> grad L as eps -> 0, so the mean of g is grad L * sqrt(n / (d' + n - 1)); the constant makes
E|g|^2 ~ |grad L|^2 (d' + n + 1) / (d' + n - 1), i.e. the estimate has about the gradient's norm. Adam divides
the scale out again except against its epsilon.

Subspace gradient. After every update the new theta goes into slot (step mod tau) of a ring buffer of tau
snapshots. When the step count reaches a multiple of tau, a PCA of the buffer (the last tau parameter vectors,
centred by their mean, not standardised per coordinate) gives components v_1, v_2, ... with variances
l_1 >= l_2 >= ... (from the eigendecomposition of the tau x tau Gram matrix of the centred snapshots, so no
d x d matrix is formed). Component j is kept while the components before it explain at most 1 - nu of the total
variance (so the first component whose cumulative share passes 1 - nu is the last one kept); R, the rest with a
defined direction (l_j > 1e-6 l_1), is projected off the estimates of the next tau steps, and k = |R|.
Directions outside the span of the centred snapshots carry no variance and define no component: they are kept.

Frozen int8 (`frozen_int8`): every frozen parameter with two or more axes is stored as {"int8": q, "scale": s},
q = round(w / s) clipped to [-127, 127] and s = max |w| / 127 per output channel (the last axis; per row for an
embedding table), and dequantized (q * s, |q s - w| <= s / 2) inside every forward pass (jaxeff/models/frozen_int8.py,
which the shared loader also uses to hand out the float model).

State: {"step", "params" (the model's tree, quantized leaves as {"int8", "scale"}), "opt_state": {"adam": the
optax state of the trainable leaves, "zo": {"removed": k, "snapshots", "basis": [tau, ...] per trainable leaf
(only with tau > 0; basis rows of kept components are zero)}}, "rng"}: resuming restores all of it, bitwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxeff.config import ConfigError
from jaxeff.config.zo import ZoConfig
from jaxeff.models.frozen_int8 import (channel_axis, dequantize, dequantize_params, is_quantized,  # noqa: F401
                                       quantize, quantized_as_plain, select_trainable)
from jaxeff.models.sst import value_of

DEFINED_VARIANCE = 1e-6  # a component with less than this fraction of the largest variance has no direction
HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- the estimator


def perturbation(key: jax.Array, i, tree: Any) -> Any:
    """z_i: standard normals shaped like `tree`, leaf j drawn from fold_in(fold_in(key, i), j)."""
    leaves, treedef = jax.tree.flatten(tree)
    probe_key = jax.random.fold_in(key, i)
    return treedef.unflatten([jax.random.normal(jax.random.fold_in(probe_key, j), x.shape, jnp.float32).astype(x.dtype)
                              for j, x in enumerate(leaves)])


def zo_gradient(loss: Callable[[Any], jax.Array], params: Any, key: jax.Array, probes: int, eps: float,
                dim=None, loss0=None) -> tuple[Any, jax.Array]:
    """(g, [g_0 .. g_{n-1}]): the estimate of the module docstring, `dim` = d' (default: the number of entries of
    `params`), `loss0` = L(params) when already known. Two loops over the probes, each regenerating z_i: the first
    runs the perturbed forward passes, the second sums g_i z_i, so one perturbed copy or one sum is alive at a time."""
    n = probes
    dim = sum(x.size for x in jax.tree.leaves(params)) if dim is None else dim
    loss0 = loss(params) if loss0 is None else loss0

    def difference(i, diffs):
        z = perturbation(key, i, params)
        perturbed = jax.tree.map(lambda p, zi: p + eps * zi, params, z)
        return diffs.at[i].set((loss(perturbed).astype(jnp.float32) - loss0.astype(jnp.float32)) / eps)

    diffs = jax.lax.fori_loop(0, n, difference, jnp.zeros((n,), jnp.float32))

    def accumulate(i, total):
        return jax.tree.map(lambda t, zi: t + diffs[i] * zi, total, perturbation(key, i, params))

    total = jax.lax.fori_loop(0, n, accumulate, jax.tree.map(jnp.zeros_like, params))
    scale = jnp.sqrt((jnp.asarray(dim, jnp.float32) + n - 1) / n) * n
    return jax.tree.map(lambda t: (t / scale).astype(t.dtype), total), diffs


# ----------------------------------------------------------------------------- the subspace


def subspace_basis(snapshots: Any, nu: float) -> tuple[Any, jax.Array, jax.Array]:
    """(basis, k, variances) from snapshots [tau, ...] per leaf: basis rows j in R are the unit directions v_j (over
    all leaves together), the other rows zero; k = |R|; variances l_j in decreasing order (Gram eigenvalues / (tau
    - 1))."""
    leaves = jax.tree.leaves(snapshots)
    tau = leaves[0].shape[0]
    centred = jax.tree.map(lambda s: (s - s.mean(0, keepdims=True)).astype(jnp.float32), snapshots)
    gram = sum(jnp.dot(c.reshape(tau, -1), c.reshape(tau, -1).T, precision=HIGHEST)
               for c in jax.tree.leaves(centred))
    lam, u = jnp.linalg.eigh(gram)
    lam, u = jnp.maximum(lam[::-1], 0.0), u[:, ::-1]
    share = lam / jnp.where(lam.sum() > 0, lam.sum(), 1.0)
    before = jnp.cumsum(share) - share  # the variance the components before j explain
    remove = (before > 1 - nu) & (lam > DEFINED_VARIANCE * lam[0])
    coef = u * jnp.where(remove, jax.lax.rsqrt(jnp.where(remove, lam, 1.0)), 0.0)  # column j: u_j / sqrt(l_j)
    basis = jax.tree.map(lambda c: jnp.tensordot(coef.T, c, axes=1, precision=HIGHEST), centred)
    return basis, remove.sum().astype(jnp.int32), lam / max(tau - 1, 1)


def project_off(g: Any, basis: Any) -> Any:
    """g - sum_j (v_j . g) v_j over the rows of `basis` (zero rows contribute nothing)."""
    coeff = sum(jnp.tensordot(b.reshape(b.shape[0], -1), x.reshape(-1).astype(jnp.float32), axes=1, precision=HIGHEST)
                for b, x in zip(jax.tree.leaves(basis), jax.tree.leaves(g)))
    return jax.tree.map(lambda x, b: (x - jnp.tensordot(coeff, b, axes=1, precision=HIGHEST)).astype(x.dtype), g, basis)


# ----------------------------------------------------------------------------- the optimizer and its state


def _flat(tree) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/", is_leaf=lambda _, node: is_quantized(node))


def _unflat(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def _rebox(like, value, names=None):
    """`value` boxed with `like`'s logical names (or `names`) when `like` is boxed."""
    if not isinstance(like, nn.LogicallyPartitioned):
        return value
    return nn.LogicallyPartitioned(value, tuple(like.names) if names is None else names)


@dataclasses.dataclass(frozen=True, eq=False)
class ZoOptimizer:
    """`make_optimizer`'s result for `train.optimizer: zo`: the settings and AdamW (with the run's clipping and
    non-finite guard) for the trainable leaves. `init_state` builds params and opt_state (boxed or plain trees)."""

    cfg: ZoConfig
    tx: optax.GradientTransformation

    def trainable(self, flat: Mapping[str, Any]) -> list[str]:
        return select_trainable([n for n, x in flat.items() if not is_quantized(x)], self.cfg.trainable)

    def init_state(self, params: Any) -> dict[str, Any]:
        """{"params", "opt_state"} around the model's parameters (fresh or loaded; boxed under eval_shape)."""
        flat = _flat(params)
        names = self.trainable(flat)
        if self.cfg.frozen_int8:
            frozen = [n for n, x in flat.items() if n not in names and value_of(x).ndim >= 2]
            if not frozen:
                raise ConfigError(f"train.zo.frozen_int8=true but train.zo.trainable={self.cfg.trainable!r} leaves no "
                                  "frozen matrix to store in int8; train fewer parameters (e.g. trainable=embeddings) "
                                  "or set frozen_int8=false")
            for n in frozen:
                x = flat[n]
                w = value_of(x)
                axis = channel_axis(n, w.ndim)
                q, s = quantize(w, axis)
                scale_names = None
                if isinstance(x, nn.LogicallyPartitioned):
                    scale_names = tuple(a if i == axis else None for i, a in enumerate(x.names))
                flat[n] = {"int8": _rebox(x, q), "scale": _rebox(x, s, scale_names)}
        train = _unflat({n: flat[n] for n in names})
        zo = {"removed": jnp.zeros((), jnp.int32)}
        tau = self.cfg.subspace_every
        if tau:
            def ring(x):
                names_ = None if not isinstance(x, nn.LogicallyPartitioned) else (None, *x.names)
                return _rebox(x, jnp.zeros((tau, *value_of(x).shape), jnp.float32), names_)

            ring_tree = jax.tree.map(ring, train, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
            zo["snapshots"], zo["basis"] = ring_tree, ring_tree
        return {"params": _unflat(flat), "opt_state": {"adam": self.tx.init(train), "zo": zo}}


def passes_per_step(train_cfg) -> int:
    """Forward-pass equivalents of one train step per example, for FLOP counts: 3 with backpropagation (forward and
    a backward of twice its cost), n + 1 forward passes with `train.optimizer: zo`."""
    return train_cfg.zo.probes + 1 if train_cfg.optimizer == "zo" else 3


def make_zo_step(loss_fn: Callable, opt: ZoOptimizer, schedule: optax.Schedule):
    """train_step(state, batch) -> (state, metrics), the signature of jaxeff.train.step's, for the ZO state."""
    cfg = opt.cfg
    tau = cfg.subspace_every

    def train_step(state, batch):
        flat = _flat(state["params"])
        names = opt.trainable(flat)
        train = _unflat({n: flat[n] for n in names})
        frozen = {n: x for n, x in flat.items() if n not in names}
        d = sum(x.size for x in jax.tree.leaves(train))

        def loss_of(t):
            # Dequantized inside each forward pass. The barrier ties the int8 weights to this pass's parameters, so
            # XLA cannot hoist the (loop-invariant) dequantization out of the probe loop and keep a float copy.
            fixed, t = jax.lax.optimization_barrier((frozen, t))
            return loss_fn(_unflat({**{n: dequantize(x) if is_quantized(x) else x for n, x in fixed.items()},
                                    **_flat(t)}), batch)

        key, next_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        loss, aux = loss_of(train)
        zo = dict(state["opt_state"]["zo"])
        g, _ = zo_gradient(lambda t: loss_of(t)[0], train, key, cfg.probes, cfg.eps, dim=d - zo["removed"],
                           loss0=loss)
        if tau:
            g = project_off(g, zo["basis"])
        updates, adam = opt.tx.update(g, state["opt_state"]["adam"], train)
        train = optax.apply_updates(train, updates)
        if tau:
            slot = state["step"] % tau
            zo["snapshots"] = jax.tree.map(lambda s, x: s.at[slot].set(x.astype(s.dtype)), zo["snapshots"], train)
            refresh = (state["step"] + 1) % tau == 0
            zo["basis"], zo["removed"] = jax.lax.cond(
                refresh, lambda s: subspace_basis(s, cfg.variance_threshold)[:2],
                lambda s: (zo["basis"], zo["removed"]), zo["snapshots"])
        params = _unflat({**flat, **_flat(train)})
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(g), "learning_rate": schedule(state["step"]),
                   "nonfinite_streak": adam.notfinite_count, "nonfinite_total": adam.total_notfinite,
                   "aux/zo_removed_directions": zo["removed"].astype(jnp.float32), **aux}
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": {"adam": adam, "zo": zo},
                     "rng": jax.random.key_data(next_key)}
        return new_state, metrics

    return train_step
