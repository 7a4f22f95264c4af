"""`jaxeff generate`: text from a language model's workdir or export (decoding itself: jaxeff/models/decoding.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxeff.artifacts.load import Trained, load_trained
from jaxeff.config import ModelConfig
from jaxeff.data.tokenizer import Tokenizer
from jaxeff.tasks import task_class


@dataclasses.dataclass
class InferenceModel:
    model: Any  # a DecoderLM
    params: Any
    tokenizer: Tokenizer
    step: int
    model_config: ModelConfig
    trained: Trained


def load_inference_model(path: str | Path) -> InferenceModel:
    """A language model and its tokenizer; ConfigError naming the right command for another task's run."""
    trained = load_trained(path)
    trained.require("lm", "generate")
    tokenizer = task_class("lm").tokenizer_of(trained.meta, trained.files_dir)
    return InferenceModel(trained.model, trained.params, tokenizer, trained.step, trained.cfg.model, trained)
