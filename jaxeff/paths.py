"""Paths the user names (--workdir, --out, --config, train.init_from, data.paths, tokenizer files): a local path or an
object-store URL (`gs://bucket/run`), behind one type.

That type is `etils.epath.Path`, Orbax's own: local paths go through `os`, `gs://` through fsspec's gcsfs, and Orbax
writes the arrays of either through tensorstore. Nothing in jaxeff calls `open()` or `os.path` on such a path.

Object stores have no directories and no atomic rename; what jaxeff does instead is written where it matters
(`jaxeff.artifacts.checkpoint`). A local emulator of the GCS JSON API is used when `STORAGE_EMULATOR_HOST` is set
(the variable Google's own clients read); tensorstore is pointed at it too.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
import uuid
from typing import Union

from etils import epath

from jaxeff.errors import UserError

Path = epath.Path
PathLike = Union[str, os.PathLike]

_OBJECT_STORE_SCHEMES = ("gs",)


def scheme_of(path: PathLike) -> str | None:
    """'gs' for `gs://bucket/x`, None for a local path."""
    text = os.fspath(path)
    return text.split("://", 1)[0] if "://" in text else None


def is_object_store(path: PathLike) -> bool:
    return scheme_of(path) is not None


def as_path(path: PathLike, flag: str = "path") -> Path:
    """`path` as an epath.Path; UserError naming `flag` for a URL scheme jaxeff cannot write, or a missing client."""
    scheme = scheme_of(path)
    if scheme is None:
        return epath.Path(os.fspath(path))
    if scheme not in _OBJECT_STORE_SCHEMES:
        raise UserError(f"{flag} {path}: the '{scheme}://' scheme is not supported; use a local path or "
                        "gs://bucket/path")
    _prepare_gcs(str(path), flag)
    return epath.Path(os.fspath(path))


def _prepare_gcs(path: str, flag: str) -> None:
    try:
        import gcsfs  # noqa: F401  (epath's backend for gs:// without TensorFlow)
        import google.cloud.storage  # noqa: F401  (TensorBoard events, through tensorboardX)
    except ImportError:
        raise UserError(f"{flag} {path}: gs:// paths need the Google Cloud Storage clients; install them with "
                        "pip install 'jaxeff[cloud]'") from None
    import fsspec

    # Another host (or Orbax's tensorstore) writes objects behind this process's back: never answer a listing
    # from gcsfs's cache (a resumed run would miss the newest checkpoint).
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:  # tensorstore has its own names for the endpoint and for "no real credentials"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator if "://" in emulator else f"http://{emulator}")
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        # gcsfs asks the real service for the bucket's type with default credentials, and warns on every path.
        logging.getLogger("gcsfs").setLevel(logging.ERROR)


def make_writable_dir(path: PathLike, flag: str) -> Path:
    """Create `path` (with parents) and prove it writable; UserError naming `flag` and the path otherwise.

    On an object store there is nothing to create: a probe object is written and deleted, which also proves that
    the bucket exists and the credentials may write to it."""
    path = as_path(path, flag)
    if is_object_store(path):
        probe = path / f".jaxeff-write-test-{uuid.uuid4().hex}"
        try:
            probe.write_text("")
            probe.unlink()
        except Exception as e:  # gcsfs raises OSError subclasses, but also HttpError and auth errors
            raise UserError(f"{flag} {path} cannot be written ({type(e).__name__}: {e}); check that the bucket "
                            "exists and that your credentials may write to it") from None
        return path
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a directory; pass a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".jaxeff-write-test-", dir=os.fspath(path))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written ({e.strerror or e}); pass a directory you can write to") from None
    return path


def expand_glob(pattern: str, flag: str) -> list[Path]:
    """The files a glob names, sorted (`**` crosses directories), local or on an object store."""
    if not is_object_store(pattern):
        return [epath.Path(m) for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]
    root = as_path(pattern, flag)
    # The longest prefix without a wildcard is listed; the rest is matched by the store's glob.
    parts = str(root).split("://", 1)[1].split("/")
    fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    if fixed == len(parts):
        return [root] if root.is_file() else []
    base = epath.Path(f"{scheme_of(pattern)}://" + "/".join(parts[:fixed]))
    return sorted((p for p in base.glob("/".join(parts[fixed:])) if p.is_file()), key=str)


def files_under(root: Path) -> list[Path]:
    """Every file below `root`, sorted. (epath's `walk` yields bucket-relative names on gs://, so it is not used.)"""
    found = []
    for path in root.iterdir():
        found.extend(files_under(path) if path.is_dir() else [path])
    return sorted(found, key=str)


def copy_tree(source: Path, target: Path) -> None:
    """Copy every file under `source` to the same relative place under `target` (any two stores)."""
    for src in files_under(source):
        dst = target / src.relative_to(source)
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.copy(dst, overwrite=True)


def write_text_atomically(path: PathLike, text: str) -> None:
    """Readers see the old text or the new, never a half-written file (other processes of a run read
    what process 0 rewrites). An object-store upload is already all-or-nothing; a local file goes
    through a sibling temporary and a rename."""
    path = as_path(path)
    if is_object_store(path):
        path.write_text(text)
        return
    partial = path.parent / f".{path.name}.{uuid.uuid4().hex}.partial"
    partial.write_text(text)
    partial.replace(path)
