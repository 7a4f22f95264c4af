"""`jaxeff import`: a Hugging Face model directory -> a jaxeff export (`params/` + `config.json` + tokenizer).

The supported `model_type`s (config.json) and how each maps onto jaxeff's parameters are the layouts in
`jaxeff/infer/hf_layouts/` (one module each, listed in its ARCHITECTURES); this module reads and converts.

Tensors are read one at a time from `model.safetensors` or the shards named by `model.safetensors.index.json`,
transposed/reshaped into jaxeff's parameter layout and checked against the shapes the jaxeff model expects.
A missing, unexpected or mis-shaped tensor is a UserError that names it.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.artifacts.checkpoint import warn
from jaxeff.artifacts.export import check_new_out_dir, write_config, write_params
from jaxeff.config import Config, ConfigError
from jaxeff.data.tokenizer import ByteTokenizer, load_tokenizer
from jaxeff.errors import UserError
from jaxeff.infer.hf_layouts import ARCHITECTURES
from jaxeff.models.params import abstract_params
from jaxeff.paths import Path, PathLike, as_path, is_object_store, make_writable_dir
from jaxeff.tasks.lm import LanguageModelTask, tokenizer_meta

# ----------------------------------------------------------------------------- reading


class SafetensorsDir:
    """The tensors of a model directory, opened lazily and read one at a time (as float32 NumPy)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UserError(f"--from {directory}: no model.safetensors or model.safetensors.index.json; "
                            "pass a Hugging Face model directory saved with safetensors")
        self._where: dict[str, Any] = {}
        for name in files:
            if not (directory / name).is_file():
                raise UserError(f"--from {directory}: shard '{name}' named by the index is missing")
            handle = safe_open(str(directory / name), framework="flax")
            for key in handle.keys():
                self._where[key] = handle

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        return np.asarray(jax.device_get(self._where[name].get_tensor(name)), dtype=np.float32)


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"--from {directory}: no config.json; pass a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--from {path} is not valid JSON ({e.msg} at line {e.lineno})") from None


# ----------------------------------------------------------------------------- conversion


def _set(tree: dict[str, Any], path: tuple[str, ...], value: np.ndarray) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _tokenizer_for(directory: Path, vocab: int):
    if (directory / "tokenizer.json").is_file():
        return load_tokenizer(str(directory / "tokenizer.json"))
    byte = ByteTokenizer()
    if vocab < byte.vocab_size:
        raise UserError(f"--from {directory}: no tokenizer.json, and the vocabulary ({vocab}) is too small for the "
                        "byte tokenizer; add the model's tokenizer.json")
    if vocab > 4 * byte.vocab_size:  # a subword model: byte ids would index the wrong embedding rows
        warn(f"--from {directory} has no tokenizer.json: the export uses the byte tokenizer ({byte.vocab_size} ids) "
             f"for a model of {vocab:,}, so text generated from it is meaningless; copy the model's tokenizer.json "
             "(OpenELM: LLaMA-2's) into the directory and import again")
    return byte


def import_checkpoint(src: PathLike, out: PathLike, dtype: str = "float32") -> tuple[Path, str, int]:
    """Convert a Hugging Face model directory; returns (export directory, model_type, parameter count)."""
    if is_object_store(src):  # safetensors memory-maps its files
        raise UserError(f"--from {src}: the Hugging Face directory must be on a local disk; copy it there first")
    src = as_path(src, "--from")
    if not src.is_dir():
        raise UserError(f"--from {src} is not a directory; pass a Hugging Face model directory")
    out = check_new_out_dir(out)
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype {dtype}: choose float32 or bfloat16")
    config = _read_config(src)
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise UserError(f"--from {src}: model_type {arch!r} cannot be imported; supported: {', '.join(ARCHITECTURES)}")
    try:
        model_cfg, tensor_maps = ARCHITECTURES[arch](config, f"--from {src}")
    except ConfigError as e:  # a value our config refuses (e.g. a non-integral head width)
        raise UserError(f"--from {src}: {e}") from None
    tokenizer = _tokenizer_for(src, model_cfg.vocab_size)
    cfg, meta = Config(task="lm", model=model_cfg), tokenizer_meta(tokenizer)
    model = LanguageModelTask.build_model(cfg, meta)
    expected = abstract_params(model, LanguageModelTask.model_input(cfg, meta))
    reader = SafetensorsDir(src)
    np_dtype = jnp.bfloat16 if dtype == "bfloat16" else np.float32

    maps = tensor_maps(model.vocab_size)
    used = [m for m in maps if m.target]  # the others (`unused`): accepted when present, never read
    for m in used:  # names first: a missing or stray tensor fails before anything is written
        if m.source not in reader.names():
            raise UserError(f"--from {src}: tensor '{m.source}' is missing (needed for {'/'.join(m.target)})")
    unexpected = sorted(reader.names() - {m.source for m in maps})
    if unexpected:
        raise UserError(f"--from {src}: {len(unexpected)} tensor(s) have no place in the {arch} model, e.g. "
                        f"'{unexpected[0]}'; is config.json the one these weights were saved with?")
    filled = {m.target for m in used}
    missing = [p for p in (tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(expected))
               if p not in filled]
    if missing:  # a bug in a mapping table, not a user error
        raise RuntimeError(f"import mapping for {arch} leaves parameters unset: {missing[:5]}")

    make_writable_dir(out, "--out")
    writer, n_params = _ParamWriter(out), 0
    try:
        for m in used:
            raw = reader.get(m.source)
            want = tuple(_lookup(expected, m.target).shape)
            try:
                value = m.transform(raw)
            except ValueError:  # a reshape that cannot work
                value = None
            if value is None or value.shape != want:
                raise UserError(f"--from {src}: tensor '{m.source}' has shape {raw.shape}, which does not fit "
                                f"{'/'.join(m.target)} {want} of the model that config.json describes")
            writer.add(m.target, value.astype(np_dtype))
            n_params += value.size
    except BaseException:
        out.rmtree(missing_ok=True)  # it was new or empty (check_new_out_dir): leave nothing half-written
        raise
    writer.finish()
    write_config(out, cfg, meta, step=0, param_count=n_params, param_dtype=dtype,
                 source={"from": str(src.absolute()), "model_type": arch})
    return out, arch, n_params


class _ParamWriter:
    """Writes `out/params` (a plain Orbax checkpoint) one tensor at a time with Orbax's partial saves, so host
    memory holds about one tensor, not the model. Without partial saves (older Orbax) it collects the tree."""

    def __init__(self, out: Path):
        self.out, self.staging = out, out / "params_staging"  # no leading dot: Orbax mis-finalizes those
        try:
            from orbax.checkpoint.experimental.v1 import partial
        except ImportError:
            partial = None
        self.partial, self.tree = partial, {}

    def add(self, path: tuple[str, ...], value: np.ndarray) -> None:
        if self.partial is None:
            _set(self.tree, path, value)
            return
        nested: dict[str, Any] = {}
        _set(nested, path, value)
        self.partial.save(self.staging, nested)

    def finish(self) -> None:
        if self.partial is None:
            write_params(self.out, self.tree)
            return
        self.partial.finalize(self.staging)
        # The PyTree itself: what StandardCheckpointer reads. On an object store this "rename" is a copy; the export
        # counts as one only once config.json is written after it.
        (self.staging / "state").rename(self.out / "params")
        self.staging.rmtree()


def _lookup(tree: dict[str, Any], path: tuple[str, ...]):
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree
