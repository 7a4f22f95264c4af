"""FR-Spec's draft vocabulary: the most frequent tokens of the training corpus (end-of-text forced in).

The token counts are stored with the draft as `token_counts.npy` (int64 [vocab], one count per token id over the
training split of the run's corpus). A workdir's config names its corpus, so `jaxeff generate --draft-vocab`
counts it on first use and writes the file into the workdir; an export's config has no data section, so its file
is written from the workdir it came from:

    python -m jaxeff.infer.fr_spec --workdir RUN --out EXPORT
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from jaxeff.config import ConfigError
from jaxeff.paths import Path, as_path

COUNTS_FILE = "token_counts.npy"


def corpus_token_counts(data_cfg, tokenizer) -> np.ndarray:
    """How often each token id occurs in the training split (the documents training reads, BOS/EOS included)."""
    from jaxeff.data.pipeline import split_documents
    from jaxeff.data.sources import load_documents

    docs = load_documents(data_cfg)
    held_out = split_documents(len(docs), data_cfg.validation_fraction, data_cfg.split_seed)
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    for ids in tokenizer.encode_batch([d for d, h in zip(docs, held_out) if not h]):
        counts += np.bincount(np.asarray(ids, np.int64), minlength=tokenizer.vocab_size)[:tokenizer.vocab_size]
    n_docs = int((~held_out).sum())
    counts[tokenizer.bos_id] += n_docs  # each packed document is BOS ids EOS
    counts[tokenizer.eos_id] += n_docs
    return counts


def write_token_counts(workdir, out=None) -> Path:
    """Count a training workdir's corpus and write `token_counts.npy` into `out` (default: the workdir)."""
    from jaxeff.artifacts.load import load_trained
    from jaxeff.tasks import task_class

    trained = load_trained(workdir)
    trained.require("lm", "generate")
    if trained.is_export:
        raise ConfigError(f"{workdir} is an export (its config has no data section); give the training workdir it "
                          "came from")
    tokenizer = task_class("lm").tokenizer_of(trained.meta)
    path = as_path(out if out is not None else workdir) / COUNTS_FILE
    np.save(str(path), corpus_token_counts(trained.cfg.data, tokenizer))
    return path


def load_token_counts(draft_dir, is_export: bool, vocab_size: int) -> np.ndarray:
    """The draft's stored counts; a workdir's are counted (and stored) on first use."""
    path = as_path(draft_dir) / COUNTS_FILE
    if not path.exists():
        if is_export:
            raise ConfigError(f"--draft-vocab needs {path} (token frequencies of the draft's training corpus); write "
                              f"it with `python -m jaxeff.infer.fr_spec --workdir TRAINING_WORKDIR --out {draft_dir}`")
        write_token_counts(draft_dir)
    counts = np.load(str(path))
    if counts.shape != (vocab_size,):
        raise ConfigError(f"{path} holds {counts.shape[0]} counts for a vocabulary of {vocab_size}; rewrite it with "
                          "`python -m jaxeff.infer.fr_spec`")
    return counts


def frequent_subset(counts_V: np.ndarray, fraction: float, eos_id: int) -> np.ndarray:
    """Sorted ids of the ceil(fraction * V) most frequent tokens (ties: the lower id), with EOS always in."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"--draft-vocab {fraction}: must be in (0, 1] (a fraction of the vocabulary, e.g. 0.25)")
    size = max(1, math.ceil(fraction * len(counts_V)))
    order = np.lexsort((np.arange(len(counts_V)), -counts_V))  # by count descending, then id ascending
    top = order[:size]
    if eos_id not in top:  # the draft must be able to end the text: EOS takes the least frequent place
        top = np.concatenate([top[:size - 1], [eos_id]])
    return np.sort(top).astype(np.int32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="write token_counts.npy (FR-Spec's draft vocabulary) for a draft")
    parser.add_argument("--workdir", required=True, help="the draft's training workdir (its config names the corpus)")
    parser.add_argument("--out", default=None, help="where to write it: the draft's export (default: the workdir)")
    args = parser.parse_args(argv)
    print(write_token_counts(args.workdir, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
