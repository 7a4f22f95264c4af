"""The export format: an inference checkpoint that plain Orbax can read without jaxeff installed.

<out>/params/        orbax StandardCheckpointer directory (a nested dict of arrays)
<out>/config.json    {"format", "task", "model": the model section, the task's other sections (forecasting:
                     "forecast"), "meta": the task's model meta, "step", "param_count", "param_dtype", "source"?,
                     "quantization"?: ternary matrices packed in params/ (jaxeff/artifacts/packed.py)}
<out>/tokenizer.json a language model's tokenizer file, when it has one (the meta names it)

Exports written before the task meta existed (`jaxeff-export-v1` for language models,
`jaxeff-forecast-export-v1` for forecasters) are read too.
"""

from __future__ import annotations

import json
from typing import Any

import orbax.checkpoint as ocp

from jaxeff.config import Config, ConfigError, config_from_dict
from jaxeff.config.legacy import migrate_moved_keys
from jaxeff.paths import Path, PathLike, as_path, is_object_store
from jaxeff.tasks import Meta, task_class

EXPORT_FORMAT = "jaxeff-export-v2"
OLD_LM_FORMAT = "jaxeff-export-v1"
OLD_FORECAST_FORMAT = "jaxeff-forecast-export-v1"


def is_export(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "params").is_dir()


def check_new_out_dir(out: PathLike) -> Path:
    out = as_path(out, "--out")
    out = out if is_object_store(out) else out.absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} already exists and is not empty; choose a new directory")
    return out


def write_params(out: Path, params) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / "params", params)
    checkpointer.wait_until_finished()


def write_config(out: Path, cfg: Config, meta: Meta, *, step: int, param_count: int, param_dtype: str = "float32",
                 source: dict | None = None, source_dir: Path | None = None,
                 quantization: dict | None = None) -> None:
    """config.json of an export (and the files its meta names, copied next to it); `params/` is written apart.
    `source_dir`: where relative files of the meta live (an export being re-exported), else the working directory.
    `quantization`: the record of packed ternary matrices in `params/` (jaxeff/artifacts/packed.py)."""
    task = task_class(cfg.task)
    record: dict[str, Any] = {"format": EXPORT_FORMAT, "task": cfg.task,
                              "model": cfg.model.model_dump(mode="json"),
                              **{name: getattr(cfg, name).model_dump(mode="json") for name in task.export_sections},
                              "meta": task.export_meta(meta, source_dir, out), "step": step,
                              "param_count": param_count, "param_dtype": param_dtype}
    if source:
        record["source"] = source
    if quantization:
        record["quantization"] = quantization
    (out / "config.json").write_text(json.dumps(record, indent=2))


def read_quantization(export_dir: Path) -> dict | None:
    """The record of an export whose params/ holds packed ternary matrices, else None."""
    return json.loads((export_dir / "config.json").read_text()).get("quantization")


def read_config(export_dir: Path) -> tuple[Config, Meta, int]:
    """(config, model meta, training step) of an export, in any format jaxeff has written."""
    where = f"{export_dir}/config.json: "
    try:
        record = json.loads((export_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}cannot be read as JSON ({e}); is {export_dir} a `jaxeff export` directory?") from None
    fmt = record.get("format")
    if fmt == EXPORT_FORMAT:
        task = task_class(record.get("task", ""))
        sections = {name: record[name] for name in ("model", *task.export_sections)}
        meta = record["meta"]
    elif fmt == OLD_LM_FORMAT:
        task = task_class("lm")
        sections = {"model": record["model"]}
        meta = {k: record[k] for k in ("tokenizer", "vocab_size", "special_tokens")}
    elif fmt == OLD_FORECAST_FORMAT:
        task = task_class("forecast")
        sections = {"model": record["model"], "forecast": record["forecast"]}
        meta = {"channels": record["channels"], "normaliser": record["normaliser"]}
    else:
        raise ConfigError(f"{where}format {fmt!r} is not a jaxeff export format ({EXPORT_FORMAT}); was it written "
                          "by `jaxeff export` or `jaxeff import`?")
    cfg = config_from_dict(migrate_moved_keys({"task": task.name, **sections}), where=where)
    return cfg, meta, int(record.get("step", 0))
