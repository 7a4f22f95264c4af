"""`jaxeff import`: a Hugging Face model directory -> a jaxeff export (`params/` + `config.json` + tokenizer).

Supported `model_type`s (config.json):
  xlstm        transformers' xLSTM layout, which the released NX-AI/xLSTM-7b checkpoint uses
  transnormer  OpenNLPLab's released TransNormerLLM layout (trust_remote_code models), onto the lightning model

Tensors are read one at a time from `model.safetensors` or the shards named by `model.safetensors.index.json`,
transposed/reshaped into jaxeff's parameter layout and checked against the shapes the jaxeff model expects.
A missing, unexpected or mis-shaped tensor is a UserError that names it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.artifacts.export import check_new_out_dir, write_config, write_params
from jaxeff.config import Config, ConfigError, LightningConfig, MlstmConfig, ModelConfig
from jaxeff.data.tokenizer import ByteTokenizer, load_tokenizer
from jaxeff.errors import UserError
from jaxeff.models.params import abstract_params
from jaxeff.paths import Path, PathLike, as_path, is_object_store, make_writable_dir
from jaxeff.tasks.lm import LanguageModelTask, tokenizer_meta

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    source: str  # name in the safetensors files
    target: tuple[str, ...]  # path in jaxeff's params
    transform: Transform


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


def _need(config: dict[str, Any], *names: str, source: str) -> Any:
    """The first of `names` present in the config (names differ between releases)."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    raise UserError(f"{source}: config.json has no '{names[0]}'; is this a complete Hugging Face config?")


# ----------------------------------------------------------------------------- layouts


def _linear(shape: tuple[int, ...]) -> Transform:
    """torch Linear weight [out, in] -> jaxeff kernel [in, *out_split]."""
    return lambda w: w.T.reshape(shape)


def _linear_to_heads(heads: int, d_out: int) -> Transform:
    """[D, H*d] out-projection weight -> kernel [H, d, D]."""
    return lambda w: w.T.reshape(heads, d_out, -1)


def _pad_rows(rows: int) -> Transform:
    return lambda w: np.pad(w, ((0, rows - w.shape[0]), (0, 0)))


def _head_kernel(rows: int) -> Transform:
    return lambda w: np.pad(w, ((0, rows - w.shape[0]), (0, 0))).T


def _xlstm(config: dict[str, Any], source: str) -> tuple[ModelConfig, Callable[[int], list[TensorMap]]]:
    if config.get("use_bias"):
        raise UserError(f"{source}: xLSTM with use_bias=true is not supported (the released models have none)")
    if config.get("weight_mode", "single") != "single":
        raise UserError(f"{source}: xLSTM weight_mode={config['weight_mode']!r} is not supported; only 'single'")
    d = int(_need(config, "hidden_size", "embedding_dim", source=source))
    heads = int(_need(config, "num_heads", source=source))
    n_layers = int(_need(config, "num_hidden_layers", "num_blocks", source=source))
    multiple = int(config.get("ffn_round_up_to_multiple_of", 64))
    mlp = int(((d * float(config.get("ffn_proj_factor", 2.667)) + multiple - 1) // multiple) * multiple)
    section = MlstmConfig(qk_dim_factor=float(config.get("qk_dim_factor", 0.5)),
                          v_dim_factor=float(config.get("v_dim_factor", 1.0)),
                          gate_soft_cap=config.get("gate_soft_cap", 15.0), cell_eps=float(config.get("eps", 1e-6)),
                          norm_eps=float(config.get("norm_eps", 1e-6)),
                          chunk_size=int(config.get("chunk_size", 64)))
    model = ModelConfig(d_model=d, n_layers=n_layers, n_heads=heads, mlp_dim=mlp, mixer_pattern=["mlstm"],
                        channel_mixer_pattern=["swiglu"], tie_embeddings=False, norm="rms",
                        norm_eps=float(config.get("norm_eps", 1e-6)),
                        logit_soft_cap=config.get("output_logit_soft_cap"),
                        vocab_size=int(_need(config, "vocab_size", source=source)), mlstm=section)
    dk, dv = section.head_dims(d, heads)

    def tensors(padded_vocab: int) -> list[TensorMap]:
        out = [TensorMap("backbone.embeddings.weight", ("embed", "embedding"), _pad_rows(padded_vocab)),
               TensorMap("backbone.out_norm.weight", ("final_norm", "scale"), lambda w: w),
               TensorMap("lm_head.weight", ("head", "kernel"), _head_kernel(padded_vocab))]
        for i in range(n_layers):
            hf, ours = f"backbone.blocks.{i}.", f"layer_{i}"
            layer = f"{hf}mlstm_layer."
            out += [
                TensorMap(f"{hf}norm_mlstm.weight", (ours, "mixer_norm", "scale"), lambda w: w),
                TensorMap(f"{layer}q.weight", (ours, "mixer", "q", "kernel"), _linear((d, heads, dk))),
                TensorMap(f"{layer}k.weight", (ours, "mixer", "k", "kernel"), _linear((d, heads, dk))),
                TensorMap(f"{layer}v.weight", (ours, "mixer", "v", "kernel"), _linear((d, heads, dv))),
                TensorMap(f"{layer}ogate_preact.weight", (ours, "mixer", "ogate", "kernel"), _linear((d, heads, dv))),
                TensorMap(f"{layer}igate_preact.weight", (ours, "mixer", "igate", "kernel"), lambda w: w.T),
                TensorMap(f"{layer}igate_preact.bias", (ours, "mixer", "igate", "bias"), lambda w: w),
                TensorMap(f"{layer}fgate_preact.weight", (ours, "mixer", "fgate", "kernel"), lambda w: w.T),
                TensorMap(f"{layer}fgate_preact.bias", (ours, "mixer", "fgate", "bias"), lambda w: w),
                TensorMap(f"{layer}multihead_norm.weight", (ours, "mixer", "norm", "scale"),
                          lambda w: w.reshape(heads, dv)),
                TensorMap(f"{layer}out_proj.weight", (ours, "mixer", "out", "kernel"), _linear_to_heads(heads, dv)),
                TensorMap(f"{hf}norm_ffn.weight", (ours, "channel_norm", "scale"), lambda w: w),
                TensorMap(f"{hf}ffn.proj_up_gate.weight", (ours, "channel", "gate", "kernel"), lambda w: w.T),
                TensorMap(f"{hf}ffn.proj_up.weight", (ours, "channel", "up", "kernel"), lambda w: w.T),
                TensorMap(f"{hf}ffn.proj_down.weight", (ours, "channel", "down", "kernel"), lambda w: w.T),
            ]
        return out

    return model, tensors


def _transnormer(config: dict[str, Any], source: str) -> tuple[ModelConfig, Callable[[int], list[TensorMap]]]:
    if config.get("bias"):
        raise UserError(f"{source}: TransNormerLLM with bias=true is not supported (the released models have none)")
    if config.get("norm_type", "simplermsnorm") != "simplermsnorm":
        raise UserError(f"{source}: TransNormerLLM norm_type={config['norm_type']!r} is not supported; "
                        "only 'simplermsnorm'")
    d = int(_need(config, "decoder_embed_dim", source=source))
    heads = int(_need(config, "decoder_attention_heads", source=source))
    n_layers = int(_need(config, "decoder_layers", source=source))
    hidden = int(config.get("hidden_dim", d))
    if hidden % heads:
        raise UserError(f"{source}: hidden_dim={hidden} is not divisible by decoder_attention_heads={heads}")
    head = hidden // heads
    lrpe = [i for i, use in enumerate(config.get("linear_use_lrpe_list") or []) if use]
    tied = bool(config.get("tie_word_embeddings", True))
    model = ModelConfig(d_model=d, n_layers=n_layers, n_heads=heads, head_dim=head,
                        mlp_dim=int(_need(config, "glu_dim", source=source)), mixer_pattern=["lightning"],
                        channel_mixer_pattern=["sglu"], norm="srms", scale_embeddings=not config.get("no_scale_embedding"),
                        tie_embeddings=tied, vocab_size=int(_need(config, "vocab_size", source=source)),
                        lightning=LightningConfig(decay_convention="code", lrpe_layers=lrpe))

    def qkvu(part: int) -> Transform:
        return lambda w: w[part * hidden:(part + 1) * hidden].T.reshape(d, heads, head)

    def tensors(padded_vocab: int) -> list[TensorMap]:
        out = [TensorMap("model.embed_tokens.weight", ("embed", "embedding"), _pad_rows(padded_vocab))]
        if not tied:
            out.append(TensorMap("lm_head.weight", ("head", "kernel"), _head_kernel(padded_vocab)))
        for i in range(n_layers):
            hf, ours = f"model.layers.{i}.", f"layer_{i}"
            out += [TensorMap(f"{hf}token_mixer.qkvu_proj.weight", (ours, "mixer", name, "kernel"), qkvu(j))
                    for j, name in enumerate(("q", "k", "v", "u"))]
            out += [
                TensorMap(f"{hf}token_mixer.out_proj.weight", (ours, "mixer", "o", "kernel"),
                          _linear_to_heads(heads, head)),
                TensorMap(f"{hf}channel_mixer.l1.weight", (ours, "channel", "gate", "kernel"), lambda w: w.T),
                TensorMap(f"{hf}channel_mixer.l2.weight", (ours, "channel", "up", "kernel"), lambda w: w.T),
                TensorMap(f"{hf}channel_mixer.l3.weight", (ours, "channel", "down", "kernel"), lambda w: w.T),
            ]
            if i in lrpe:
                out.append(TensorMap(f"{hf}token_mixer.lrpe.theta", (ours, "mixer", "lrpe_theta"),
                                     lambda w: w.reshape(heads, head)))
        return out

    return model, tensors


ARCHITECTURES = {"xlstm": _xlstm, "transnormer": _transnormer}


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
    for m in maps:  # names first: a missing or stray tensor fails before anything is written
        if m.source not in reader.names():
            raise UserError(f"--from {src}: tensor '{m.source}' is missing (needed for {'/'.join(m.target)})")
    unexpected = sorted(reader.names() - {m.source for m in maps})
    if unexpected:
        raise UserError(f"--from {src}: {len(unexpected)} tensor(s) have no place in the {arch} model, e.g. "
                        f"'{unexpected[0]}'; is config.json the one these weights were saved with?")
    filled = {m.target for m in maps}
    missing = [p for p in (tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(expected))
               if p not in filled]
    if missing:  # a bug in a mapping table, not a user error
        raise RuntimeError(f"import mapping for {arch} leaves parameters unset: {missing[:5]}")

    make_writable_dir(out, "--out")
    writer, n_params = _ParamWriter(out), 0
    try:
        for m in maps:
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
