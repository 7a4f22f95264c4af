"""The jit-compiled train and eval steps around a task's loss and metrics (jaxeff/tasks)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxeff.train.zo import ZoOptimizer, make_zo_step

Batch = dict[str, jax.Array]  # the task's arrays, batch first
LossFn = Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]  # (params, batch) -> (loss, aux)


def _split_microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...] taking rows i*n + j into microbatch j, so each device keeps its own rows."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    microbatches: int) -> Callable[[Any, Batch], tuple[Any, dict[str, jax.Array]]]:
    if isinstance(tx, ZoOptimizer):  # train.optimizer: zo (no backward pass; microbatches=1, checked)
        return make_zo_step(loss_fn, tx, schedule)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(params, batch):
        if microbatches == 1:
            (loss, aux), grads = grad_fn(params, batch)
            return loss, aux, grads

        def body(carry, micro):
            (loss, aux), grads = grad_fn(params, micro)
            return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

        (loss0, aux0), zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], _split_microbatches(
            batch, microbatches)))
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, aux0, zeros))
        total, _ = jax.lax.scan(body, init, _split_microbatches(batch, microbatches))
        return jax.tree.map(lambda x: x / microbatches, total)

    def train_step(state, batch: Batch):
        loss, aux, grads = accumulate(state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state["step"]),
                   "nonfinite_streak": opt_state.notfinite_count, "nonfinite_total": opt_state.total_notfinite,
                   **aux}
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}
        return new_state, metrics

    return train_step
