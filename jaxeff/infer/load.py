"""Load a trained model for inference from a training workdir or from an export directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from jaxeff.config import ConfigError, ModelConfig, config_from_dict, read_saved_config
from jaxeff.config.legacy import migrate_moved_keys
from jaxeff.data.tokenizer import Tokenizer, load_tokenizer
from jaxeff.models.lm import DecoderLM, build_model


@dataclasses.dataclass
class InferenceModel:
    model: DecoderLM
    params: Any
    tokenizer: Tokenizer
    step: int
    model_config: ModelConfig


def _abstract_params(model: DecoderLM, seq_len: int = 8):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, seq_len), "int32"))["params"])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), nn.meta.unbox(boxed))


def _from_workdir(workdir: Path) -> InferenceModel:
    from jaxeff.train.checkpoint import CheckpointStore, restore_newest

    cfg = read_saved_config(workdir / "config.yaml")
    if cfg.task != "lm":
        raise ConfigError(f"{workdir} is a forecasting run (task: {cfg.task}); use `jaxeff forecast --workdir {workdir}` "
                          "(generate is for language models)")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg.model, tokenizer.vocab_size)
    store = CheckpointStore(workdir / "checkpoints", read_only=True)
    abstract = _abstract_params(model)
    try:
        found = restore_newest(store, abstract, lambda step: store.restore_params(step, abstract))
    finally:
        store.close()
    if found is None:
        raise ConfigError(f"{workdir}/checkpoints holds no complete checkpoint yet; train first (jaxeff train)")
    step, params = found
    return InferenceModel(model, params, tokenizer, step, cfg.model)


def _from_export(export_dir: Path) -> InferenceModel:
    meta = json.loads((export_dir / "config.json").read_text())
    if meta.get("task") == "forecast":
        raise ConfigError(f"{export_dir} is a forecasting export; use `jaxeff forecast --workdir {export_dir}`")
    model_cfg = config_from_dict(migrate_moved_keys({"model": meta["model"]}), where=f"{export_dir}/config.json: ").model
    tokenizer = load_tokenizer(meta["tokenizer"], base_dir=export_dir)
    model = build_model(model_cfg, tokenizer.vocab_size)
    params = ocp.StandardCheckpointer().restore((export_dir / "params").absolute(), _abstract_params(model))
    return InferenceModel(model, params, tokenizer, int(meta.get("step", 0)), model_cfg)


def load_inference_model(path: str | Path) -> InferenceModel:
    path = Path(path)
    if (path / "config.json").is_file() and (path / "params").is_dir():
        return _from_export(path)
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return _from_workdir(path)
    raise ConfigError(f"'{path}' is neither a training workdir (config.yaml + checkpoints/) nor an export "
                      "(config.json + params/); pass --workdir of a `jaxeff train` run or of a `jaxeff export`")
