"""`jaxeff export`: an inference checkpoint that plain Orbax can read without jaxeff installed.

<out>/params/        orbax StandardCheckpointer directory (a nested dict of float32 arrays)
<out>/config.json    model hyper-parameters, vocabulary and tokenizer, training step
<out>/tokenizer.json copied when training used a Hugging Face tokenizer

Forecasting runs (task: forecast) export params/ the same way and a config.json with the model and forecast
sections, the normaliser and the channel names (jaxeff/infer/forecast.py); `jaxeff forecast` reads either.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxeff.config import ConfigError
from jaxeff.paths import make_writable_dir
from jaxeff.infer.load import load_inference_model
from jaxeff.train.state import count_params

EXPORT_FORMAT = "jaxeff-export-v1"


def check_new_out_dir(out: str | Path) -> Path:
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} already exists and is not empty; choose a new directory")
    return out


def write_params(out: Path, params) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / "params", params)
    checkpointer.wait_until_finished()


def write_meta(out: Path, model_config, tokenizer, padded_vocab_size: int, step: int, param_count: int,
               param_dtype: str = "float32", source: dict | None = None) -> None:
    """config.json (and the tokenizer file) of an export; `params/` is written separately."""
    tokenizer_spec = tokenizer.spec
    if tokenizer_spec != "byte":
        shutil.copyfile(tokenizer_spec, out / "tokenizer.json")
        tokenizer_spec = "tokenizer.json"
    meta = {
        "format": EXPORT_FORMAT,
        "architecture": "DecoderLM",
        "model": model_config.model_dump(mode="json"),
        "vocab_size": tokenizer.vocab_size,
        "padded_vocab_size": padded_vocab_size,
        "tokenizer": tokenizer_spec,
        "special_tokens": {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id},
        "param_dtype": param_dtype,
        "param_count": param_count,
        "step": step,
        **({"source": source} if source else {}),
    }
    (out / "config.json").write_text(json.dumps(meta, indent=2))


def _is_forecasting_run(workdir) -> bool:
    from jaxeff.config import read_saved_config

    path = Path(workdir) / "config.yaml"
    return path.is_file() and read_saved_config(path).task == "forecast"


def export_checkpoint(workdir: str | Path, out: str | Path) -> tuple[Path, int]:
    """Write the export; returns (its directory, the training step exported)."""
    out = check_new_out_dir(out)
    if _is_forecasting_run(workdir):
        from jaxeff.infer.forecast import export_forecaster

        make_writable_dir(out, "--out")
        return out, export_forecaster(workdir, out)
    loaded = load_inference_model(workdir)
    make_writable_dir(out, "--out")
    write_params(out, jax.device_get(loaded.params))
    write_meta(out, loaded.model_config, loaded.tokenizer, loaded.model.vocab_size, loaded.step,
               count_params(loaded.params))
    return out, loaded.step
