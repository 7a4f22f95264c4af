"""The training methods that store a model's matrices in another form (train.sst: factors, train.lora: frozen base
plus adapters): the run's model and the run's parameters from a plain model's, one place for the trainer and
`jaxeff plan` to compose them. Each wrapper's `apply` turns its layout back into the model's own tree."""

from __future__ import annotations

from typing import Any

from jaxeff.train.lora import adapt_params, lora_model
from jaxeff.train.sst import factorise_params, sst_model


def run_model(model, cfg, init_input) -> Any:
    """The model the run trains: `model` itself, or wrapped by SST or LoRA (the config checks refuse both at once)."""
    return lora_model(sst_model(model, cfg, init_input), cfg, init_input)


def run_params(params, cfg) -> Any:
    """A plain model's parameters (train.init_from) in the run's layout."""
    return adapt_params(factorise_params(params, cfg), cfg)
