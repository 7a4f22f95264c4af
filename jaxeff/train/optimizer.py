"""AdamW with linear warmup and cosine decay, global-norm clipping, and a non-finite update guard."""

from __future__ import annotations

import jax
import optax

from jaxeff.config import TrainConfig
from jaxeff.train.zo import ZoOptimizer
from jaxeff.train.lora import with_lora
from jaxeff.train.sst import with_sst


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.steps, end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _decay_mask(params):
    # Decay matrices only; norm scales (1-D) keep their values.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation | ZoOptimizer:
    """The guard is outermost: a step whose updates hold NaN/Inf leaves params and moments untouched
    and increments `notfinite_count`; the trainer stops when that count reaches the configured limit."""
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=_decay_mask)
    adamw = with_sst(adamw, cfg, learning_rate_schedule(cfg))  # factorised matrices (train.sst): their own update
    chain = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw
    chain = with_lora(chain, cfg)  # train.lora: the trainable leaves only; frozen ones get no update and no state
    # +1: we stop at the limit ourselves, before optax would start applying non-finite updates.
    guarded = optax.apply_if_finite(chain, max_consecutive_errors=cfg.max_consecutive_nonfinite + 1)
    # train.optimizer: zo: the same update on zeroth-order estimates of the trainable leaves (jaxeff/train/zo.py).
    return ZoOptimizer(cfg.zo, guarded) if cfg.optimizer == "zo" else guarded
