"""Typed run configuration: dataclasses loaded from YAML plus dotted command-line overrides.

Everything a user can get wrong is checked here, before JAX compiles anything, and reported as a
`ConfigError` whose message names the key and the fix. The CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user error in the configuration (bad key, type or value). Never a bug in jaxeff."""


@dataclass
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (no grouping)
    head_dim: int | None = None  # None: d_model // n_heads
    mlp_dim: int = 384
    # Token / channel mixers per layer, cycled over the layers: ["lightning", "attention"] alternates.
    mixer_pattern: list[str] = field(default_factory=lambda: ["attention"])
    channel_mixer_pattern: list[str] = field(default_factory=lambda: ["swiglu"])
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    remat: Literal["none", "full", "dots_saveable"] = "none"
    vocab_multiple: int = 128  # vocab is padded up to a multiple of this (keeps tensor sharding even)
    norm: Literal["rms", "srms"] = "rms"  # block norms: RMSNorm with a learned scale, or scale-free SRMSNorm
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (TransNormerLLM)
    # Lightning attention (TransNormerLLM) mixers:
    decay_convention: Literal["code", "paper"] = "code"  # per-head/layer decay rates, see docs/models/tnl.md
    lrpe_layers: list[int] = field(default_factory=lambda: [0])  # layers with LRPE-d positions on q and k
    lightning_impl: Literal["auto", "reference", "chunked", "pallas"] = "auto"
    lightning_block_size: int = 64


@dataclass
class DataConfig:
    source: Literal["stdlib", "text", "jsonl", "arrayrecord"] = "stdlib"
    paths: list[str] = field(default_factory=list)  # files or glob patterns for text/jsonl/arrayrecord
    tokenizer: str = "byte"  # "byte" or the path of a Hugging Face tokenizer.json
    seq_len: int = 128
    validation_fraction: float = 0.02  # share of documents held out for evaluation
    split_seed: int = 0
    shuffle_seed: int = 0
    max_documents: int | None = None  # cap on documents read (for quick experiments)
    num_workers: int = 0  # grain worker processes; 0 = in-process


@dataclass
class MeshConfig:
    data: int = -1  # -1 = all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 16
    microbatches: int = 1  # gradient accumulation: the global batch is split into this many parts
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 disables clipping
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 4
    max_consecutive_nonfinite: int = 5  # stop after this many skipped (NaN/Inf) steps in a row
    jit: bool = True  # false runs eagerly (debug mode, step through in a debugger)


@dataclass
class CheckpointConfig:
    every: int = 100
    keep: int = 3
    async_save: bool = True


@dataclass
class LoggingConfig:
    every: int = 10
    progress_bar: bool = True
    peak_tflops_per_device: float | None = None  # override for MFU; known GPUs/TPUs need none


@dataclass
class SampleConfig:
    """Text generated at the end of training (and the defaults of `jaxeff generate`)."""

    prompt: str = "def "
    max_new_tokens: int = 120
    temperature: float = 0.8
    top_k: int = 40
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` checked against the annotation `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only reached if a new annotation kind is added above
        raise TypeError(f"unsupported config annotation {tp} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _unknown_key(key: str, valid: list[str], section: str) -> ConfigError:
    where = f"{section}.{key}" if section else key
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{where}'{hint}; valid keys here: {', '.join(valid)}")


def _build(cls: type, raw: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise _unknown_key(str(key), names, section)
        full = f"{section}.{key}" if section else key
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of keys, got {value!r}")
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.steps=100' -> ('train.steps', 100). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value (for example train.steps=100)")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e.problem})") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply overrides, check types. Raises ConfigError."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist (pass --config PATH, e.g. configs/debug.yaml)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, data:, train:, ...)")
        raw = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    return _build(Config, raw, "")


def config_from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, "")


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- validation


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with the -1 axis filled in; ConfigError when they do not fit the devices."""
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor, "expert": mesh.expert}
    free = [k for k, v in sizes.items() if v == -1]
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{k}={v}: axis sizes must be positive, or -1 for 'the remaining devices'")
    if len(free) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + k for k in free)}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh: the fixed axes use {fixed} devices, which does not divide the {num_devices} devices "
                f"present; change mesh.{'/'.join(k for k in sizes if k not in free)}"
            )
        sizes[free[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    if total > num_devices:
        raise ConfigError(
            f"mesh: data*fsdp*tensor*expert = {'*'.join(str(v) for v in sizes.values())} = {total} devices, "
            f"but only {num_devices} {'is' if num_devices == 1 else 'are'} present; shrink the mesh (e.g. mesh.data=-1)"
        )
    return sizes


def validate(cfg: Config, num_devices: int, num_processes: int = 1) -> dict[str, int]:
    """Check cross-field consistency; return the resolved mesh shape. Raises ConfigError."""
    m, d, t = cfg.model, cfg.data, cfg.train
    positive = {
        "model.d_model": m.d_model, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
        "model.mlp_dim": m.mlp_dim, "model.vocab_multiple": m.vocab_multiple, "data.seq_len": d.seq_len,
        "train.steps": t.steps, "train.global_batch_size": t.global_batch_size,
        "train.microbatches": t.microbatches, "train.eval_every": t.eval_every,
        "train.max_consecutive_nonfinite": t.max_consecutive_nonfinite,
        "checkpoint.every": cfg.checkpoint.every, "checkpoint.keep": cfg.checkpoint.keep,
        "logging.every": cfg.logging.every,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value}: must be positive")
    if t.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate={t.learning_rate}: must be positive")
    if t.warmup_steps < 0 or t.eval_batches < 0 or d.num_workers < 0:
        raise ConfigError("train.warmup_steps, train.eval_batches and data.num_workers must be >= 0")
    if t.warmup_steps >= t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be smaller than train.steps={t.steps}; "
                          f"also set e.g. train.warmup_steps={t.steps // 10}")
    if not 0.0 < d.validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction={d.validation_fraction}: must be between 0 and 1 (exclusive)")
    if not m.mixer_pattern or not m.channel_mixer_pattern:
        raise ConfigError("model.mixer_pattern and model.channel_mixer_pattern need at least one entry")

    n_kv = m.n_kv_heads or m.n_heads
    if m.head_dim is None and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; "
            f"pick n_heads from {_divisors(m.d_model)} or set model.head_dim"
        )
    if m.n_heads % n_kv:
        raise ConfigError(
            f"model.n_kv_heads={n_kv} must divide model.n_heads={m.n_heads} (grouped-query attention); "
            f"pick one of {_divisors(m.n_heads)}"
        )
    if (m.head_dim or m.d_model // m.n_heads) % 2:
        raise ConfigError("the head dimension must be even for rotary embeddings; change model.n_heads or model.head_dim")
    if m.lightning_block_size <= 0:
        raise ConfigError(f"model.lightning_block_size={m.lightning_block_size}: must be positive")
    bad_layers = [i for i in m.lrpe_layers if not 0 <= i < m.n_layers]
    if bad_layers:
        raise ConfigError(f"model.lrpe_layers={m.lrpe_layers}: layers {bad_layers} are outside 0..{m.n_layers - 1}")
    if d.source != "stdlib" and not d.paths:
        raise ConfigError(f"data.source={d.source!r} needs data.paths (a list of files or glob patterns)")

    mesh = resolve_mesh_shape(cfg.mesh, num_devices)
    batch_shards = mesh["data"] * mesh["fsdp"]
    if t.global_batch_size % t.microbatches:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.microbatches={t.microbatches}"
        )
    micro = t.global_batch_size // t.microbatches
    if micro % batch_shards:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} / train.microbatches={t.microbatches} = {micro} rows "
            f"per microbatch is not divisible by the data-parallel size mesh.data*mesh.fsdp={batch_shards}; "
            f"use a global batch that is a multiple of {batch_shards * t.microbatches}"
        )
    if t.global_batch_size % num_processes:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by the "
                          f"{num_processes} processes; each process loads an equal share of every batch")
    tp = mesh["tensor"]
    for key, value in {"model.n_heads": m.n_heads, "model.n_kv_heads": n_kv, "model.mlp_dim": m.mlp_dim}.items():
        if value % tp:
            raise ConfigError(f"{key}={value} is not divisible by mesh.tensor={tp}; change one of them")
    if m.vocab_multiple % tp:
        raise ConfigError(f"model.vocab_multiple={m.vocab_multiple} is not divisible by mesh.tensor={tp}")
    if m.d_model % mesh["fsdp"]:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by mesh.fsdp={mesh['fsdp']}")
    return mesh


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]
