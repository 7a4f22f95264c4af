"""Tokenizers: a built-in byte-level one and Hugging Face `tokenizers` JSON files."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from jaxeff.config import ConfigError
from jaxeff.paths import PathLike, as_path, is_object_store


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    spec: str  # what `load_tokenizer` needs to rebuild it ("byte" or a file path)

    def encode(self, text: str) -> np.ndarray: ...
    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...
    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus three specials: PAD=256, BOS=257, EOS=258."""

    spec = "byte"
    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HuggingFaceTokenizer:
    """A `tokenizer.json` file from the Hugging Face `tokenizers` library (never downloaded)."""

    def __init__(self, path: PathLike):
        from tokenizers import Tokenizer as HFTokenizer

        path = as_path(path, "data.tokenizer")
        if path.is_dir():
            raise ConfigError(f"data.tokenizer: '{path}' is a directory; give the tokenizer.json file inside it")
        if not path.is_file():
            raise ConfigError(f"data.tokenizer: file '{path}' does not exist (use 'byte' or a tokenizer.json path)")
        try:
            self._tok = HFTokenizer.from_str(path.read_text())
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise ConfigError(f"data.tokenizer: '{path}' is not a Hugging Face tokenizer.json ({e})") from None
        self.spec = str(path)
        base = self._tok.get_vocab_size(with_added_tokens=True)
        ids = {name: self._tok.token_to_id(name) for name in ("<pad>", "<s>", "</s>", "<|endoftext|>")}
        # Use the file's own specials when present, else append ids past the vocabulary.
        self.eos_id = ids["</s>"] if ids["</s>"] is not None else ids["<|endoftext|>"]
        self.bos_id = ids["<s>"]
        self.pad_id = ids["<pad>"]
        extra = base
        if self.eos_id is None:
            self.eos_id, extra = extra, extra + 1
        if self.bos_id is None:
            self.bos_id, extra = extra, extra + 1
        if self.pad_id is None:
            self.pad_id, extra = extra, extra + 1
        self.vocab_size = extra

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) < self._tok.get_vocab_size(True)])


def load_tokenizer(spec: str, base_dir: PathLike | None = None) -> Tokenizer:
    """'byte' or a tokenizer.json path (relative paths resolve against `base_dir` when given)."""
    if spec == "byte":
        return ByteTokenizer()
    path = as_path(spec, "data.tokenizer")
    if base_dir is not None and not is_object_store(path) and not path.is_absolute() and not path.exists():
        path = as_path(base_dir) / spec
    return HuggingFaceTokenizer(path)
