"""Language modelling: next-token cross entropy on packed text windows, a text sample at the end.

Model meta: `{"tokenizer": "byte" | path of a tokenizer.json, "vocab_size": ids, "special_tokens": {...}}`; an
export copies the tokenizer file next to it and records `"tokenizer.json"` (resolved against the export).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.config import Config
from jaxeff.data import build_corpus, eval_batches, load_tokenizer, train_dataset
from jaxeff.data.tokenizer import Tokenizer
from jaxeff.models.decoding import generate_text
from jaxeff.models.lm import build_model, decoding_config, flops_per_token, inactive_params
from jaxeff.models.parscale import parscale_params
from jaxeff.paths import Path, as_path
from jaxeff.tasks.base import Batch, Meta, Task


def lm_loss(model, params, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross entropy (float32) plus any auxiliary losses the mixers report."""
    ce_BS, _, aux = model.apply({"params": params}, batch["inputs"], targets_BS=batch["targets"])
    ce = ce_BS.mean()
    aux_loss = sum((v for k, v in aux.items() if k.startswith("loss/")), jnp.zeros((), jnp.float32))
    return ce + aux_loss, {"ce_loss": ce, **aux}


def tokenizer_meta(tokenizer: Tokenizer) -> Meta:
    return {"tokenizer": tokenizer.spec, "vocab_size": tokenizer.vocab_size,
            "special_tokens": {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}}


class LanguageModelTask(Task):
    name = "lm"
    command = "generate"
    unit = "tok"

    @classmethod
    def build_model(cls, cfg: Config, meta: Meta, platform: str | None = None):
        return build_model(cfg.model, meta["vocab_size"], platform)

    @classmethod
    def build_inference_model(cls, cfg: Config, meta: Meta, platform: str | None = None):
        return build_model(decoding_config(cfg.model), meta["vocab_size"], platform)  # MoE: dropless

    @classmethod
    def model_input(cls, cfg: Config, meta: Meta) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((1, cfg.data.seq_len), np.int32)

    @classmethod
    def legacy_meta(cls, cfg: Config, checkpoint_meta) -> Meta:
        return tokenizer_meta(load_tokenizer(cfg.data.tokenizer))  # what the old loader did: the config's tokenizer

    @classmethod
    def export_meta(cls, meta: Meta, source_dir: Path | None, out: Path) -> Meta:
        if meta["tokenizer"] == "byte":
            return meta
        as_path(cls.tokenizer_of(meta, source_dir).spec).copy(out / "tokenizer.json", overwrite=True)
        return {**meta, "tokenizer": "tokenizer.json"}

    @classmethod
    def inactive_params(cls, cfg: Config) -> int:
        return inactive_params(cfg.model)

    @staticmethod
    def tokenizer_of(meta: Meta, base_dir: Path | None = None) -> Tokenizer:
        """The tokenizer the meta names (a relative file resolves against `base_dir`, an export's directory)."""
        return load_tokenizer(meta["tokenizer"], base_dir=base_dir)

    # ------------------------------------------------------------------ training

    def load_data(self) -> Meta:
        self.tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        self.corpus = build_corpus(self.cfg.data, self.tokenizer)
        return tokenizer_meta(self.tokenizer)

    def meta_without_data(self) -> Meta:
        return tokenizer_meta(load_tokenizer(self.cfg.data.tokenizer))  # the vocabulary: all the model needs

    def batch_shapes(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        tokens = jax.ShapeDtypeStruct((global_batch_size, self.cfg.data.seq_len), np.int32)
        return {"inputs": tokens, "targets": tokens}

    def train_batches(self, per_process_batch: int, start_row: int = 0):
        return train_dataset(self.corpus, self.cfg.data, per_process_batch, start_row=start_row)

    def eval_batches(self, per_process_batch: int, n_batches: int):
        return eval_batches(self.corpus, per_process_batch, n_batches)

    def loss(self, params, batch: Batch):
        return lm_loss(self.model, params, batch)

    def eval_metrics(self, params, batch: Batch) -> dict[str, jax.Array]:
        return {"loss": lm_loss(self.model, params, batch)[0]}

    @property
    def data_meta(self) -> dict:
        return {"num_workers": self.cfg.data.num_workers}

    def units_per_example(self) -> int:
        return self.cfg.data.seq_len

    def flops_per_example(self) -> float:
        seq_len = self.cfg.data.seq_len
        return flops_per_token(self.cfg.model, self.meta["vocab_size"], seq_len) * seq_len

    def describe(self) -> str:
        text = f"{self.corpus.n_documents} documents / {self.corpus.n_tokens:,} tokens"
        m = self.cfg.model
        if m.parscale.enabled:
            seq_len, vocab = self.cfg.data.seq_len, self.meta["vocab_size"]
            one_stream = m.model_copy(update={"parscale": m.parscale.model_copy(update={"streams": 1})})
            ratio = flops_per_token(m, vocab, seq_len) / flops_per_token(one_stream, vocab, seq_len)
            text += (f", {m.parscale.streams} ParScale streams ({parscale_params(m):,} parameters in their starts "
                     f"and aggregation, {ratio:.2f}x the FLOPs per token of one stream)")
        return text

    def finish(self, params_host, progress) -> str | None:
        s = self.cfg.sample
        if s.max_new_tokens <= 0:
            return None
        text = generate_text(self.model, params_host, self.tokenizer, s.prompt, s.max_new_tokens, s.temperature,
                             s.top_k, s.seed)
        progress.print(f"--- sample (prompt {s.prompt!r}) ---\n{text}\n---")
        return text
