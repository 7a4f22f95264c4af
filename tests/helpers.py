"""Shared test helpers (tiny configs, subprocess environments)."""

import contextlib
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

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


def run_jaxeff(*args: str, devices: int = 1, timeout: int = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*jaxeff_cmd(), *args], capture_output=True, text=True, env=subprocess_env(devices),
                          timeout=timeout, cwd=cwd)


def assert_user_error(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit code 2, one line on stderr that contains `message`, no traceback anywhere."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]


def full_and_stepped_logits(cfg, prompt: int, seq: int = 13, batch: int = 2, edit_params=None):
    """Logits of a tiny model of `cfg` on random tokens: the full forward, and a prefill of `prompt` tokens followed
    by one-token steps with the decode caches. Also returns the initial caches (to check their shapes)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxeff.models.decoding import decode_caches
    from jaxeff.models.lm import build_model

    model = build_model(cfg, 259, platform="cpu")
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, 259)
    params = nn.meta.unbox(model.init(jax.random.key(1), tokens))["params"]
    if edit_params is not None:
        params = edit_params(params)
    apply = jax.jit(model.apply)
    full, _, _ = apply({"params": params}, tokens)
    caches = decode_caches(model, params, batch, seq)  # under ParScale, every stream's learned start
    out, state, _ = apply({"params": params}, tokens[:, :prompt], jnp.broadcast_to(jnp.arange(prompt), (batch, prompt)),
                          caches)
    outs = [out]
    for t in range(prompt, seq):
        out, state, _ = apply({"params": params}, tokens[:, t:t + 1], jnp.full((batch, 1), t), state)
        outs.append(out)
    return full, jnp.concatenate(outs, 1), caches


# ----------------------------------------------------------------------------- sequence-parallel op tests


def split_over_devices(sharded_fn, args, specs, out_spec, axes: dict):
    """`sharded_fn(*args, axis_name="sequence")` in a shard_map over a mesh of the simulated CPU devices with these
    axes (name -> size), the sequence axis named "sequence"."""
    sizes = tuple(axes.values())
    mesh = Mesh(np.asarray(jax.devices()[: int(np.prod(sizes))]).reshape(sizes), tuple(axes),
                axis_types=(AxisType.Auto,) * len(axes))
    run = jax.shard_map(functools.partial(sharded_fn, axis_name="sequence"), mesh=mesh, in_specs=specs,
                        out_specs=out_spec, check_vma=False)
    return run(*args)


def grads_of(fn, args, cotangent):
    """Jitted gradients of sum(fn(*args) * cotangent) with respect to every argument."""
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent), argnums=tuple(range(len(args)))))(*args)


def float64_if(dtype):
    """float64 on for one test (jax.enable_x64 on versions with it, jax.experimental.enable_x64 before)."""
    if dtype != jnp.float64:
        return contextlib.nullcontext()
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


def worst_relative_error(got, want) -> float:
    """The largest absolute difference over the largest |want| (in float64)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def float32_model_of_export(export_dir):
    """(model in float32 on CPU, its parameters, its model config) of an export or import directory."""
    from jaxeff.infer import load_inference_model
    from jaxeff.models.lm import build_model

    loaded = load_inference_model(export_dir)
    cfg = loaded.model_config.model_copy(deep=True)
    cfg.compute_dtype = "float32"
    return build_model(cfg, loaded.tokenizer.vocab_size, platform="cpu"), loaded.params, cfg

