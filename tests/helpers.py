"""Shared test helpers (tiny configs, subprocess environments)."""

import os
import shutil
import sys
from pathlib import Path

from jaxeff.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
def tiny_overrides(**extra) -> list[str]:
    """A 2-layer d=32 model on 40 stdlib files: compiles in seconds, steps in milliseconds."""
    base = {
        "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "model.mlp_dim": 64,
        "data.seq_len": 32, "data.max_documents": 40, "data.validation_fraction": 0.1,
        "train.global_batch_size": 8, "train.steps": 6, "train.warmup_steps": 2, "train.eval_every": 3,
        "train.eval_batches": 1, "checkpoint.every": 3, "logging.every": 1, "logging.progress_bar": False,
        "sample.max_new_tokens": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_config(**extra) -> Config:
    return load_config(None, tiny_overrides(**extra))


def subprocess_env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def jaxeff_cmd() -> list[str]:
    return [sys.executable, "-m", "jaxeff"]


def tb_losses(workdir: Path) -> dict[int, float]:
    """step -> training loss as logged to TensorBoard in `workdir/tb`."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(workdir / "tb"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("loss")}


def rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of a finished run whose newest checkpoint is `step` (later ones and logs removed)."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").iterdir():
        if ckpt.name.isdigit() and int(ckpt.name) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(dst / "tb")
    return dst
