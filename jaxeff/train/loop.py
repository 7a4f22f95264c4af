"""The training loop: build everything from a Config, run, checkpoint, resume, evaluate, log."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from jaxeff.config import Config, ConfigError, dump_config, load_config, validate
from jaxeff.data import build_corpus, eval_batches, load_tokenizer, train_dataset
from jaxeff.infer.generate import generate_text
from jaxeff.layers.registry import check_mixer_names
from jaxeff.models.lm import build_model, flops_per_token
from jaxeff.parallel.mesh import build_mesh
from jaxeff.parallel.report import memory_summary, parameter_table
from jaxeff.parallel.sharding import batch_sharding, replicated
from jaxeff.train.checkpoint import CheckpointStore
from jaxeff.train.metrics import Progress, TensorBoardWriter, device_memory_bytes, peak_flops_per_device
from jaxeff.train.optimizer import learning_rate_schedule, make_optimizer
from jaxeff.train.preemption import PreemptionGuard
from jaxeff.train.state import (abstract_boxed_state, abstract_state_and_shardings, count_params, init_state,
                                logical_axes)
from jaxeff.train.step import make_eval_step, make_train_step

log = logging.getLogger("jaxeff")

# Keys that may change between a run and its resumption without breaking the restore.
RESUMABLE_CHANGES = ("train.steps", "train.eval_every", "train.eval_batches", "train.jit", "checkpoint.",
                     "logging.", "sample.", "data.num_workers", "train.max_consecutive_nonfinite")


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. non-finite losses); the message says why and what to change."""


@dataclasses.dataclass
class TrainResult:
    final_step: int
    losses: dict[int, float]  # step -> training loss (every step)
    eval_losses: dict[int, float]
    sample: str | None
    exit_code: int  # 0 finished; 128 + signal when stopped by SIGTERM / SIGINT
    params: Any = None


def apply_debug_mode(cfg: Config) -> list[str]:
    """--debug: one device, NaN checks, small batch and sequence. Returns what was changed, to print."""
    changes = []
    jax.config.update("jax_debug_nans", True)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.expert = 1, 1, 1, 1
    changes.append("mesh: 1 device, jax_debug_nans on")
    if cfg.train.global_batch_size > 4:
        cfg.train.global_batch_size, cfg.train.microbatches = 4, 1
        changes.append("train.global_batch_size=4, train.microbatches=1")
    if cfg.data.seq_len > 64:
        cfg.data.seq_len = 64
        changes.append("data.seq_len=64")
    cfg.checkpoint.async_save = False
    return changes


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume_compatible(saved_path: Path, cfg: Config) -> list[str]:
    """Differences that would break the restore raise ConfigError; harmless ones are returned."""
    saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
    now = _flatten(cfg.to_dict())
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    blocking = [k for k in changed if not k.startswith(RESUMABLE_CHANGES)]
    if blocking:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in blocking[:6])
        raise ConfigError(f"the workdir {saved_path.parent} holds checkpoints of a different run ({detail}); "
                          "use a new --workdir, or the same config to resume")
    return changed


def _global_batch(mesh, local_batch: dict[str, np.ndarray], global_batch_size: int) -> dict[str, jax.Array]:
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_batch_size, *v.shape[1:]))
            for k, v in local_batch.items()}


def train(cfg: Config, workdir: str | Path, *, debug: bool = False, console: bool = True) -> TrainResult:
    workdir = Path(workdir)
    if debug and jax.process_count() > 1:
        raise ConfigError("--debug runs on one device of one process; start it without a launcher")
    notes = apply_debug_mode(cfg) if debug else []
    devices = jax.devices()[:1] if debug else jax.devices()
    validate(cfg, len(devices), jax.process_count())
    check_mixer_names(cfg.model)
    tcfg = cfg.train

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    corpus = build_corpus(cfg.data, tokenizer)

    ckpt_dir = workdir / "checkpoints"
    resuming = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if resuming and (workdir / "config.yaml").is_file():
        for key in check_resume_compatible(workdir / "config.yaml", cfg):
            notes.append(f"resuming with a changed setting: {key}")
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        dump_config(cfg, workdir / "config.yaml")

    model = build_model(cfg.model, tokenizer.vocab_size)
    tx = make_optimizer(tcfg)
    schedule = learning_rate_schedule(tcfg)
    mesh = build_mesh(cfg, devices)
    abstract, shardings = abstract_state_and_shardings(model, tx, mesh, tcfg.seed, cfg.data.seq_len)

    per_process_batch = tcfg.global_batch_size // jax.process_count()
    data_iter = iter(train_dataset(corpus, cfg.data, per_process_batch))
    # What the saved iterator states depend on besides the process count.
    data_meta = {"global_batch_size": tcfg.global_batch_size, "num_workers": cfg.data.num_workers}
    store = CheckpointStore(ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    start_step = store.latest_step()
    if start_step is not None:
        state, iterator_restored = store.restore(start_step, abstract, data_iter, data_meta)
        if not iterator_restored:  # another topology wrote it: continue the same global order
            data_iter = iter(train_dataset(corpus, cfg.data, per_process_batch,
                                           start_row=start_step * tcfg.global_batch_size))
        notes.append(f"resumed from checkpoint step {start_step}"
                     + ("" if iterator_restored else " (data position rebuilt for this topology)"))
    else:
        state = init_state(model, tx, shardings, tcfg.seed, cfg.data.seq_len)
        start_step = 0

    train_step = make_train_step(model, tx, schedule, tcfg.microbatches)
    eval_step = make_eval_step(model)
    run_eagerly = not tcfg.jit
    compiled = None
    if not run_eagerly:
        batch_shape = jax.ShapeDtypeStruct((tcfg.global_batch_size, cfg.data.seq_len), jax.numpy.int32,
                                           sharding=batch_sharding(mesh))
        with jax.set_mesh(mesh):  # compile ahead of time: the memory report needs the executable
            compiled = jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)),
                               out_shardings=(shardings, replicated(mesh)), donate_argnums=0).lower(
                abstract, {"inputs": batch_shape, "targets": batch_shape}).compile()
        train_step = compiled
        eval_step = jax.jit(eval_step, in_shardings=(shardings["params"], batch_sharding(mesh)),
                            out_shardings=replicated(mesh))

    n_params = count_params(state["params"])
    tokens_per_step = tcfg.global_batch_size * cfg.data.seq_len
    train_flops_per_step = 3 * flops_per_token(cfg.model, tokenizer.vocab_size, cfg.data.seq_len) * tokens_per_step
    peak = peak_flops_per_device(cfg.logging.peak_tflops_per_device)

    progress = Progress(tcfg.steps, start_step, cfg.logging.progress_bar and console)
    progress.print(f"jaxeff: {n_params / 1e6:.2f}M params, mesh {dict(mesh.shape)} on {len(devices)} "
                   f"{devices[0].platform} device(s), {corpus.n_documents} documents / {corpus.n_tokens:,} tokens, "
                   f"workdir {workdir}")
    if len(devices) > 1:
        boxed = abstract_boxed_state(model, tx, tcfg.seed, cfg.data.seq_len)
        for row in parameter_table(abstract["params"], logical_axes(boxed["params"]), shardings["params"]):
            progress.print("  " + row)
    progress.print(f"jaxeff: {memory_summary(abstract, shardings, compiled)}")
    for note in notes:
        progress.print(f"jaxeff: {note}")
    writer = TensorBoardWriter(workdir / "tb")

    losses: dict[int, float] = {}
    eval_losses: dict[int, float] = {}
    step = start_step
    pending = None  # (step, metrics) of the step in flight: read one step late to keep the device busy
    interval_start, interval_steps = time.perf_counter(), 0
    run_start = time.perf_counter()
    exit_code = 0

    def run_eval(params) -> float:
        batches = eval_batches(corpus, per_process_batch, tcfg.eval_batches)
        with (jax.disable_jit() if run_eagerly else contextlib.nullcontext()):
            values = [float(eval_step(params, _global_batch(mesh, b, tcfg.global_batch_size))) for b in batches]
        return float(np.mean(values)) if values else float("nan")

    def drain(pending_item) -> None:
        """Record a finished step's metrics; stop if the non-finite streak hit the limit."""
        done_step, metrics = pending_item
        metrics = jax.device_get(metrics)
        losses[done_step] = float(metrics["loss"])
        if int(metrics["nonfinite_streak"]) >= tcfg.max_consecutive_nonfinite:
            raise TrainingStopped(
                f"{int(metrics['nonfinite_streak'])} steps in a row had non-finite gradients (step {done_step}); "
                "those updates were skipped and parameters are the last finite ones. Lower train.learning_rate, "
                "set train.grad_clip, or check the data; rerun with --debug to find the first NaN.")
        first = done_step == start_step + 1
        if not (first or done_step % cfg.logging.every == 0 or done_step == tcfg.steps):
            return
        elapsed = time.perf_counter() - interval_start
        scalars = {"loss": losses[done_step], "learning_rate": float(metrics["learning_rate"]),
                   "grad_norm": float(metrics["grad_norm"]), "nonfinite_skipped_total": float(metrics["nonfinite_total"]),
                   **{k: float(v) for k, v in metrics.items() if k.startswith(("loss/", "aux/"))},
                   **device_memory_bytes()}
        if first:  # includes tracing and compilation: reported on its own, kept out of throughput
            scalars["first_step_with_compile_s"] = elapsed
            tokens_per_s = 0.0
        else:
            step_time = elapsed / max(interval_steps, 1)
            tokens_per_s = tokens_per_step / step_time
            scalars.update({"tokens_per_s": tokens_per_s, "step_time_s": step_time,
                            "model_tflops_per_s_per_device": train_flops_per_step / step_time / len(devices) / 1e12})
            if peak:
                scalars["mfu"] = train_flops_per_step / step_time / (peak * len(devices))
        writer.scalars(done_step, scalars)
        progress.update(done_step, losses[done_step], tokens_per_s)
        restart_interval()

    def restart_interval() -> None:
        nonlocal interval_start, interval_steps
        interval_start, interval_steps = time.perf_counter(), 0

    # The mesh context lets the models' activation sharding hints apply while the steps are traced.
    with jax.set_mesh(mesh), PreemptionGuard() as guard:
        try:
            while step < tcfg.steps:
                batch = _global_batch(mesh, next(data_iter), tcfg.global_batch_size)
                with (jax.disable_jit() if run_eagerly else contextlib.nullcontext()):
                    state, metrics = train_step(state, batch)
                step += 1
                interval_steps += 1
                if pending is not None:
                    drain(pending)
                pending = (step, metrics)
                if step % tcfg.eval_every == 0 or step == tcfg.steps:
                    drain(pending)
                    pending = None
                    eval_losses[step] = run_eval(state["params"])
                    writer.scalars(step, {"eval_loss": eval_losses[step]})
                    progress.print(f"step {step}: eval loss {eval_losses[step]:.4f}")
                    restart_interval()  # keep evaluation time out of the step time
                stop = guard.should_stop(step)
                if step % cfg.checkpoint.every == 0 or stop:
                    store.save(step, state, data_iter, data_meta)
                if stop:
                    exit_code = guard.exit_code
                    break
            if pending is not None:
                drain(pending)
        except TrainingStopped:
            store.save_final(step, state, data_iter, data_meta)
            writer.close()
            progress.close()
            raise
        store.save_final(step, state, data_iter, data_meta)

    writer.close()
    progress.close()
    sample = None
    if exit_code:
        progress.print(f"jaxeff: stopped by signal {exit_code - 128} at step {step}; checkpoint saved in {ckpt_dir}. "
                       "Run the same command again to resume.")
    else:
        # Every process joins the gather (parameters may live on other hosts); process 0 samples.
        params = jax.device_get(jax.jit(lambda p: p, out_shardings=replicated(mesh))(state["params"]))
        if cfg.sample.max_new_tokens > 0 and jax.process_index() == 0:
            s = cfg.sample
            sample = generate_text(model, params, tokenizer, s.prompt, s.max_new_tokens, s.temperature, s.top_k,
                                   s.seed)
            progress.print(f"--- sample (prompt {s.prompt!r}) ---\n{sample}\n---")
        last_loss = losses.get(step, float("nan"))
        last_eval = eval_losses[max(eval_losses)] if eval_losses else float("nan")
        elapsed = time.perf_counter() - run_start
        progress.print(f"jaxeff: done, step {step}, loss {last_loss:.4f}, eval loss {last_eval:.4f}, "
                       f"{(step - start_step) * tokens_per_step / elapsed:,.0f} tok/s over {elapsed:.0f}s, "
                       f"checkpoints in {ckpt_dir}, TensorBoard: tensorboard --logdir {workdir / 'tb'}")
    return TrainResult(step, losses, eval_losses, sample, exit_code, state["params"])


def train_from_files(config_path: str | None, overrides: list[str], workdir: str, debug: bool = False) -> TrainResult:
    return train(load_config(config_path, overrides), workdir, debug=debug)
