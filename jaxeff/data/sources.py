"""Document sources: the embedded stdlib corpus, text files, JSONL and ArrayRecord.

Each source yields documents (str) in a fixed order so that every process and every rerun sees
the same corpus.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from pathlib import Path
from typing import Iterator

from jaxeff.config import ConfigError, DataConfig

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
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise ConfigError(f"{key}: '{pattern}' matches no file; check the path (relative to {Path.cwd()})")
        files.extend(Path(m) for m in matches if Path(m).is_file())
    return files


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
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

    source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    for i in range(len(source)):
        record = source[i]
        yield record.decode("utf-8", errors="replace") if isinstance(record, bytes) else str(record)


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    if cfg.source == "stdlib":
        for path in stdlib_files():
            yield _read_text(path)
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
