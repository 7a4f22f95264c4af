"""`jaxeff generate`: text from a language model's workdir or export (decoding itself: jaxeff/models/decoding.py)."""

from __future__ import annotations

import dataclasses
from jaxeff.paths import Path

from jaxeff.artifacts.load import Trained, load_trained
from jaxeff.config import ConfigError
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


def _tokenizer_identity(tokenizer: Tokenizer) -> tuple:
    """What two models must agree on to share token ids: the kind, the vocabulary, the specials, the file's text."""
    text = None if tokenizer.spec == "byte" else Path(tokenizer.spec).read_text()
    return (type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
            text)


def check_same_tokenizer(target: InferenceModel, draft: InferenceModel) -> None:
    if _tokenizer_identity(target.tokenizer) != _tokenizer_identity(draft.tokenizer):
        raise ConfigError(
            f"--draft {draft.trained.directory} uses tokenizer {draft.tokenizer.spec!r} (vocabulary "
            f"{draft.tokenizer.vocab_size}) but --workdir {target.trained.directory} uses {target.tokenizer.spec!r} "
            f"(vocabulary {target.tokenizer.vocab_size}); a draft must share the target's tokenizer")


def speculative_text(target: InferenceModel, draft: InferenceModel, prompt: str, max_new_tokens: int,
                     temperature: float, top_k: int, seed: int, draft_tokens: int,
                     draft_vocab: float | None = None):
    """(prompt + generated text, SpeculativeStats): `generate_text`'s output, decoded speculatively."""
    import numpy as np

    from jaxeff.infer.fr_spec import frequent_subset, load_token_counts
    from jaxeff.infer.speculative import speculative_generate_ids

    check_same_tokenizer(target, draft)
    tok = target.tokenizer
    subset = None
    if draft_vocab is not None:
        counts = load_token_counts(draft.trained.directory, draft.trained.is_export, tok.vocab_size)
        subset = frequent_subset(counts, draft_vocab, tok.eos_id)
    prompt_ids = [tok.bos_id, *np.asarray(tok.encode(prompt)).tolist()]
    ids, stats = speculative_generate_ids(target.model, target.params, draft.model, draft.params, prompt_ids,
                                          max_new_tokens, draft_tokens=draft_tokens, temperature=temperature,
                                          top_k=top_k, seed=seed, vocab_size=tok.vocab_size, stop_id=tok.eos_id,
                                          draft_subset=subset)
    return prompt + tok.decode(ids), stats
