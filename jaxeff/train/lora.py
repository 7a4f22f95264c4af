"""LoRA adapters (`train.lora`, Hu et al. 2021): the model wrapper, the optimizer that leaves frozen parameters
alone, and the run's parameters from a plain model (train.init_from).

The parameterisation (which kernels, W' = W + (alpha / r) A B^T, stop_gradient on what is frozen) is
jaxeff/models/lora.py. Training: the run's optimizer (clipping, AdamW, the schedule) sees the trainable leaves only
(optax.multi_transform; every frozen leaf gets a zero update and no optimizer state), so the optimizer state and
the gradient norm are those of the adapters (plus, with `freeze: adapted`, the parameters not adapted).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import optax

from jaxeff.config import ConfigError, TrainConfig
from jaxeff.models.lm import DecoderLM, is_block_name
from jaxeff.models.lora import adapt, merge, scale_of, trains
from jaxeff.models.stored_layout import StoredLayoutModel, boxed_init_params
from jaxeff.models.sst import path_name, selected_names

ADAPTER_SEED = 0x4C6F5241  # folded into the parameter-init key for the adapters' A matrices ("LoRA")


def adapter_key(init_key: jax.Array) -> jax.Array:
    return jax.random.fold_in(init_key, ADAPTER_SEED)


class LoraModel(StoredLayoutModel):
    """A model whose selected kernels carry adapters: `init` adds them to the model's fresh parameters, `apply`
    merges them first (a DecoderLM: each block merges its own, inside its remat)."""

    def __init__(self, model, lora_cfg, d_model: int):
        super().__init__(model)
        self.lora_cfg, self.lora_d_model = lora_cfg, d_model  # prefixed: other names reach the wrapped model

    def stored_params(self, params, key):
        c = self.lora_cfg
        return adapt(params, c.layers, c.rank, self.lora_d_model, adapter_key(key))

    def model_params(self, params):
        return merge(params, scale_of(self.lora_cfg), self.lora_cfg.freeze)

    def apply(self, variables, *args, **kwargs):
        if not isinstance(self.wrapped, DecoderLM):
            return super().apply(variables, *args, **kwargs)
        model = self.wrapped.clone(block_params=self.model_params)
        params = {name: tree if is_block_name(name) else self.model_params(tree)
                  for name, tree in variables["params"].items()}
        return model.apply({**variables, "params": params}, *args, **kwargs)


def lora_model(model, cfg, init_input) -> Any:
    """The run's model under `train.lora` (the model itself when rank is 0); ConfigError when the pattern selects
    no matrix."""
    c = cfg.train.lora
    if not c.rank:
        return model
    if not selected_names(boxed_init_params(model, init_input), c.layers):
        raise ConfigError(f"train.lora.layers={c.layers!r} matches no parameter matrix; use a pattern on paths such "
                          "as layer_0/mixer/q/kernel (the default adapts every mixer's projections)")
    return LoraModel(model, c, cfg.model.d_model)


def trainable_labels(freeze: str):
    """param_labels for optax.multi_transform: "train" or "frozen" per (plain or boxed) parameter."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "train" if trains(path_name(p), freeze) else "frozen", params,
            is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))

    return labels


def with_lora(tx: optax.GradientTransformation, cfg: TrainConfig) -> optax.GradientTransformation:
    """`tx` on the trainable leaves, zero updates (and no state) for the frozen ones; `tx` itself without LoRA."""
    if not cfg.lora.rank:
        return tx
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, trainable_labels(cfg.lora.freeze))


def adapt_params(params, cfg):
    """Plain parameters (train.init_from) in the run's adapted layout, with the adapters a fresh run would get."""
    c = cfg.train.lora
    if not c.rank:
        return params
    init_key = jax.random.split(jax.random.key(cfg.train.seed))[0]  # the key train/state.py initialises with
    return adapt(params, c.layers, c.rank, cfg.model.d_model, adapter_key(init_key))


def lora_notes(cfg, params) -> list[str]:
    """A header line: how many parameters train."""
    c = cfg.train.lora
    if not c.rank:
        return []
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(x.size for _, x in leaves)
    trained = sum(x.size for p, x in leaves if trains(path_name(p), c.freeze))
    return [f"LoRA r={c.rank}, alpha={c.alpha:g} on {len(selected_names(params, r'/lora_A$'))} matrices: "
            f"{trained / 1e6:.3f}M of {total / 1e6:.3f}M parameters train (freeze: {c.freeze})"]
