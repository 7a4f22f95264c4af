"""Grain input pipeline: tokenize, split by document, pack into windows, shuffle, shard, batch.

Packing concatenates documents as BOS doc EOS BOS doc EOS ... and cuts the stream into windows of
seq_len + 1 tokens (inputs are the first seq_len, targets the last seq_len). Documents are split
into train and validation before packing, so no text is in both.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterator

import grain
import jax
import numpy as np

from jaxeff.config import ConfigError, DataConfig
from jaxeff.data.sources import load_documents
from jaxeff.data.tokenizer import Tokenizer


class PackedWindows:
    """Random-access grain source over one token stream: item i is tokens[i*S : i*S + S + 1]."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str):
        self.tokens, self.seq_len, self.name = tokens, seq_len, name
        self._len = (len(tokens) - 1) // seq_len
        # Stable identity for grain's state checks: a digest of the content, not an object address.
        self._digest = hashlib.sha1(tokens.tobytes()).hexdigest()[:12]

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def __repr__(self) -> str:
        return f"PackedWindows(name={self.name}, seq_len={self.seq_len}, windows={self._len}, digest={self._digest})"


def _to_example(window_S: np.ndarray) -> dict[str, np.ndarray]:
    """A window of S + 1 tokens -> inputs (the first S) and targets (the last S)."""
    return {"inputs": window_S[:-1], "targets": window_S[1:]}


def pack(docs_tokens: list[np.ndarray], tok: Tokenizer) -> np.ndarray:
    pieces = []
    for ids in docs_tokens:
        pieces += [np.array([tok.bos_id], np.int32), ids.astype(np.int32), np.array([tok.eos_id], np.int32)]
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


def split_documents(n_docs: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out documents: a seeded random subset, at least one doc on each side."""
    rng = np.random.default_rng(seed)
    held_out = rng.random(n_docs) < fraction
    if not held_out.any():
        held_out[rng.integers(n_docs)] = True
    if held_out.all():
        held_out[0] = False
    return held_out


@dataclasses.dataclass
class Corpus:
    train: PackedWindows
    validation: PackedWindows
    n_documents: int
    n_tokens: int


def build_corpus(cfg: DataConfig, tok: Tokenizer) -> Corpus:
    docs = load_documents(cfg)
    held_out = split_documents(len(docs), cfg.validation_fraction, cfg.split_seed)
    tokens = tok.encode_batch(docs)
    train = pack([t for t, h in zip(tokens, held_out) if not h], tok)
    val = pack([t for t, h in zip(tokens, held_out) if h], tok)
    for name, stream in (("training", train), ("validation", val)):
        if len(stream) < cfg.seq_len + 1:
            raise ConfigError(
                f"data: the {name} split has {len(stream)} tokens, fewer than data.seq_len+1={cfg.seq_len + 1}; "
                "add documents, lower data.seq_len or change data.validation_fraction"
            )
    return Corpus(PackedWindows(train, cfg.seq_len, "train"), PackedWindows(val, cfg.seq_len, "validation"),
                  len(docs), sum(len(t) for t in tokens))


# (share, shares) of every global batch this process loads, set by the trainer from its mesh
# (jaxeff.parallel.mesh.process_row_shards); None: one share per process.
_ROW_SHARE: tuple[int, int] | None = None


def use_row_share(index: int, count: int) -> None:
    """Load share `index` of `count` of every batch: processes whose devices hold the same rows (a sequence- or
    tensor-parallel group spanning hosts) load the same share."""
    global _ROW_SHARE
    _ROW_SHARE = (index, count)


def process_shard() -> tuple[int, int]:
    return _ROW_SHARE if _ROW_SHARE is not None else (jax.process_index(), jax.process_count())


def _allow_grain_workers() -> None:
    """grain's worker processes read absl flags, which raise unless parsed; jaxeff has no absl main."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def train_dataset(corpus: Corpus, cfg: DataConfig, per_process_batch: int, start_row: int = 0) -> grain.IterDataset:
    """Endless, reshuffled every epoch, this process's slice of every global batch of text windows."""
    return shuffled_batches(corpus.train, _to_example, cfg.shuffle_seed, cfg.num_workers, per_process_batch, start_row)


def shuffled_batches(source, to_example, shuffle_seed: int, num_workers: int, per_process_batch: int,
                     start_row: int = 0) -> grain.IterDataset:
    """Endless, reshuffled every epoch, this process's slice of every global batch of `source`'s examples.

    Share p of n (`process_shard`: one per process, or per group of processes that hold the same rows) reads
    global rows start_row + p, start_row + p + n, ...: the global order does not depend on n, so
    `start_row = step * global_batch_size` resumes any topology exactly.
    """
    index, count = process_shard()
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(None)
    ds = ds[start_row + index :: count].map(to_example).to_iter_dataset()
    if num_workers > 0:
        _allow_grain_workers()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    # Batch after prefetching so the batch order does not depend on the worker count.
    return ds.batch(per_process_batch, drop_remainder=True)


def eval_batches(corpus: Corpus, per_process_batch: int, n_batches: int) -> Iterator[dict[str, np.ndarray]]:
    """The same first `n_batches` validation batches every time (wrapping around a small split)."""
    return fixed_batches(corpus.validation, _to_example, per_process_batch, n_batches)


def fixed_batches(source, to_example, per_process_batch: int, n_batches: int) -> Iterator[dict[str, np.ndarray]]:
    """The first `n_batches` batches of `source` in order, the same every time (wrapping around a small source)."""
    index, count = process_shard()
    ds = grain.MapDataset.source(source).repeat(None)[index::count].map(to_example)
    it = iter(ds.batch(per_process_batch, drop_remainder=True))
    for _ in range(n_batches):
        yield next(it)
