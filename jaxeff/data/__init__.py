"""Data: tokenizers, document sources and the grain pipeline."""

from jaxeff.data.pipeline import Corpus, build_corpus, eval_batches, train_dataset, use_row_share
from jaxeff.data.tokenizer import ByteTokenizer, HuggingFaceTokenizer, Tokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "Corpus", "HuggingFaceTokenizer", "Tokenizer", "build_corpus", "eval_batches",
           "load_tokenizer", "train_dataset", "use_row_share"]
