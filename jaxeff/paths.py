"""Directories the user names (--workdir, --out): created and checked before anything is written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from jaxeff.errors import UserError


def make_writable_dir(path: Path, flag: str) -> Path:
    """Create `path` (with parents) and prove it writable; UserError naming `flag` and the path otherwise."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a directory; pass a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".jaxeff-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written ({e.strerror or e}); pass a directory you can write to") from None
    return path
