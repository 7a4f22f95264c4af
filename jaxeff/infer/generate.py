"""`jaxeff generate`: text from a language model's workdir or export (decoding itself: jaxeff/models/decoding.py)."""

from __future__ import annotations

import dataclasses
from jaxeff.paths import Path

from jaxeff.artifacts.load import Trained, load_trained
from jaxeff.data.tokenizer import Tokenizer
from jaxeff.tasks import task_class


@dataclasses.dataclass
class InferenceModel:
    """A trained language model and its tokenizer."""

    trained: Trained
    tokenizer: Tokenizer

    @property
    def model(self):  # a DecoderLM
        return self.trained.model

    @property
    def params(self):  # what the model runs with: a QAT run's quantized matrices
        return self.trained.run_params

    @property
    def step(self) -> int:
        return self.trained.step

    @property
    def model_config(self):
        return self.trained.cfg.model


def load_inference_model(path: str | Path) -> InferenceModel:
    """A language model and its tokenizer; ConfigError naming the right command for another task's run."""
    trained = load_trained(path)
    trained.require("lm", "generate")
    return InferenceModel(trained, task_class("lm").tokenizer_of(trained.meta, trained.files_dir))
