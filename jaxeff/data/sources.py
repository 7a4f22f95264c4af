"""Document sources: the embedded stdlib corpus, text files, JSONL and ArrayRecord.

Each source yields documents (str) in a fixed order so that every process and every rerun sees
the same corpus.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Iterator

from jaxeff.config import ConfigError, DataConfig
from jaxeff.paths import as_path, expand_glob, is_object_store

_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}


def stdlib_files() -> list[Path]:
    """The running interpreter's own standard-library sources, test folders excluded, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    if not files:
        raise ConfigError(f"data.source='stdlib': no Python sources under {root}; use data.source=text instead")
    return sorted(files)


def _expand(patterns: list[str], key: str = "data.paths") -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        if as_path(pattern, key).is_dir():
            raise ConfigError(f"{key}: '{pattern}' is a directory; give files or a glob such as '{pattern}/*.txt' "
                              f"or '{pattern}/**/*.jsonl'")
        found = expand_glob(pattern, key)
        if not found:
            where = "" if is_object_store(pattern) else f" (relative to {Path.cwd()})"
            raise ConfigError(f"{key}: '{pattern}' matches no file; check the path{where}")
        files.extend(found)
    return files


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"data.paths: cannot read '{path}' ({e.strerror})") from None


def _decode(raw: bytes, where: str) -> str:
    """Strict UTF-8: a binary or compressed file is refused by name instead of training on U+FFFD."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        kind = " (gzip-compressed: decompress it first)" if raw[:2] == b"\x1f\x8b" else " (a binary file?)"
        raise ConfigError(f"data.paths: {where} is not UTF-8 text: invalid byte at offset {e.start}{kind}; "
                          "convert it to UTF-8 or remove it from data.paths") from None
    if "\x00" in text:
        raise ConfigError(f"data.paths: {where} contains NUL bytes, so it is not a text file; remove it from "
                          "data.paths")
    return text


def _read_text(path: Path) -> str:
    return _decode(_read_bytes(path), f"'{path}'")


def _read_stdlib_source(path: Path) -> str:
    # The interpreter's own files: a rare legacy encoding is not the user's problem.
    return path.read_text(encoding="utf-8", errors="replace")


def _jsonl_documents(path: Path) -> Iterator[str]:
    for line_no, raw_line in enumerate(_read_bytes(path).splitlines(), 1):
        line = _decode(raw_line, f"'{path}' line {line_no}")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"data.paths: {path}:{line_no} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f"data.paths: {path}:{line_no} has no string field 'text' (JSONL records need one)")
        yield record["text"]


def _arrayrecord_documents(paths: list[Path]) -> Iterator[str]:
    import grain

    for path in paths:  # one file at a time, so that an error names the file
        if is_object_store(path):
            raise ConfigError(f"data.paths: '{path}': ArrayRecord files are read from a local disk only; copy them "
                              "there, or use data.source=text or jsonl, which read gs:// directly")
        try:
            source = grain.sources.ArrayRecordDataSource([str(path)])
            n_records = len(source)
        except Exception as e:  # the C++ reader raises plain RuntimeError/ValueError with long texts
            first_line = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise ConfigError(f"data.paths: '{path}' is not a readable ArrayRecord file ({first_line}); "
                              "use data.source=text or jsonl for plain files") from None
        for i in range(n_records):
            record = source[i]
            yield _decode(record, f"'{path}' record {i}") if isinstance(record, bytes) else str(record)


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    if cfg.source == "stdlib":
        for path in stdlib_files():
            yield _read_stdlib_source(path)
    elif cfg.source == "text":
        for path in _expand(cfg.paths):
            yield _read_text(path)
    elif cfg.source == "jsonl":
        for path in _expand(cfg.paths):
            yield from _jsonl_documents(path)
    elif cfg.source == "arrayrecord":
        yield from _arrayrecord_documents(_expand(cfg.paths))
    else:  # the config loader already restricts the values
        raise ConfigError(f"data.source: unknown source {cfg.source!r}")


def load_documents(cfg: DataConfig) -> list[str]:
    docs = []
    for doc in iter_documents(cfg):
        if doc:
            docs.append(doc)
        if cfg.max_documents is not None and len(docs) >= cfg.max_documents:
            break
    if len(docs) < 2:
        raise ConfigError(
            f"data: found {len(docs)} non-empty document(s) in {cfg.source} {cfg.paths or ''}; need at least 2 "
            "(one for training, one held out for validation)"
        )
    return docs
