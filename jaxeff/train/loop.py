"""The training loop: build everything from a Config, run, checkpoint, resume, evaluate, log."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import jax
import numpy as np

from jaxeff.artifacts.checkpoint import CheckpointStore, param_shapes, restore_newest, shape_mismatch, warn
from jaxeff.artifacts.load import load_trained
from jaxeff.config import Config, ConfigError, dump_config, read_saved_config, validate
from jaxeff.config.resume import check_resume
from jaxeff.data import use_row_share
from jaxeff.models.params import count_params
from jaxeff.models.parscale import is_parscale_param
from jaxeff.models.qat import on_quantized_params, param_quantizer, qat_notes
from jaxeff.models.lora import merged_abstract
from jaxeff.models.sst import plain_abstract
from jaxeff.parallel.collectives import collective_stats
from jaxeff.parallel.mesh import build_mesh, process_row_shards
from jaxeff.parallel.report import memory_summary, parameter_table
from jaxeff.parallel.sharding import batch_sharding, replicated
from jaxeff.paths import Path, PathLike, make_writable_dir
from jaxeff.tasks import Task, build_task
from jaxeff.train.comm_report import aot_compile_train_step, comm_scalars, comm_summary
from jaxeff.train.metrics import Progress, TensorBoardWriter, peak_flops_per_device
from jaxeff.train.optimizer import learning_rate_schedule, make_optimizer
from jaxeff.train.preemption import PreemptionGuard
from jaxeff.train.state import (abstract_boxed_state, abstract_state_and_shardings, init_params, init_state,
                                init_state_from_params, logical_axes)
from jaxeff.train.lora import lora_notes
from jaxeff.train.reparam import run_model, run_params
from jaxeff.train.step import make_train_step
from jaxeff.train.telemetry import StepTelemetry, Throughput, TrainingStopped  # noqa: F401 (re-exported)
from jaxeff.train.zo import dequantize_params, passes_per_step, quantized_as_plain

@dataclasses.dataclass
class TrainResult:
    final_step: int
    losses: dict[int, float]  # step -> training loss (every step)
    eval_losses: dict[int, float]
    sample: str | None  # what the task showed at the end (a text sample, a forecast table)
    exit_code: int  # 0 finished; 128 + signal when stopped by SIGTERM / SIGINT
    params: Any = None


def apply_debug_mode(cfg: Config) -> list[str]:
    """--debug: one device, NaN checks, small batch and sequence. Returns what was changed, to print."""
    changes = []
    jax.config.update("jax_debug_nans", True)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.sequence, cfg.mesh.tensor, cfg.mesh.expert = 1, 1, 1, 1, 1
    changes.append("mesh: 1 device, jax_debug_nans on")
    if cfg.train.global_batch_size > 4:
        cfg.train.global_batch_size, cfg.train.microbatches = 4, 1
        changes.append("train.global_batch_size=4, train.microbatches=1")
    if cfg.data.seq_len > 64:
        cfg.data.seq_len = 64
        changes.append("data.seq_len=64")
    cfg.checkpoint.async_save = False
    return changes


def _global_batch(mesh, local_batch: dict[str, np.ndarray], global_batch_size: int) -> dict[str, jax.Array]:
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_batch_size, *v.shape[1:]))
            for k, v in local_batch.items()}


@dataclasses.dataclass
class _Run:
    """Everything built from the config before the first step."""

    cfg: Config
    workdir: Path
    devices: list
    notes: list[str]
    task: Task
    tx: Any
    mesh: Any
    abstract: Any  # ShapeDtypeStructs of the train state, carrying their shardings
    shardings: Any
    store: CheckpointStore
    data_meta: dict[str, Any]  # what the saved iterator states depend on besides the process count
    row_share: tuple[int, int] = (0, 1)  # (share, shares) of every batch this process loads
    data_iter: Any = None
    state: Any = None
    start_step: int = 0

    @property
    def per_process_batch(self) -> int:
        return self.cfg.train.global_batch_size // self.row_share[1]

    def global_batch(self, local_batch) -> dict[str, jax.Array]:
        return _global_batch(self.mesh, local_batch, self.cfg.train.global_batch_size)


def _setup(cfg: Config, workdir: PathLike, debug: bool) -> _Run:
    if debug and jax.process_count() > 1:
        raise ConfigError("--debug runs on one device of one process; start it without a launcher")
    notes = apply_debug_mode(cfg) if debug else []
    devices = jax.devices()[:1] if debug else jax.devices()
    validate(cfg, len(devices))
    task = build_task(cfg)
    task.model = run_model(task.model, cfg, task.init_input)  # train.sst / train.lora: their layouts, the model's in apply
    workdir = make_writable_dir(workdir, "--workdir")
    ckpt_dir = workdir / "checkpoints"
    if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        notes += _compare_with_saved_config(workdir, cfg)
    if jax.process_index() == 0:
        dump_config(cfg, workdir / "config.yaml")

    tx = make_optimizer(cfg.train)
    mesh = build_mesh(cfg, devices)
    if mesh.size < len(devices):
        notes.append(f"the mesh uses {mesh.size} of the {len(devices)} devices present; set one mesh axis to -1 "
                     "to use them all")
    row_share = process_row_shards(mesh, cfg.train.global_batch_size)[jax.process_index()]
    use_row_share(*row_share)
    abstract, shardings = abstract_state_and_shardings(task.model, tx, mesh, cfg.train.seed, task.init_input)
    store = CheckpointStore(ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    # The task meta rides along so that every checkpoint can rebuild its model without the training data.
    data_meta = {"global_batch_size": cfg.train.global_batch_size, "row_shares": row_share[1], **task.data_meta,
                 "task_meta": task.meta}
    run = _Run(cfg, workdir, devices, notes, task, tx, mesh, abstract, shardings, store, data_meta, row_share=row_share)
    _restore_or_init(run)
    return run


def _compare_with_saved_config(workdir: Path, cfg: Config) -> list[str]:
    """Notes for the header; ConfigError for a change that makes it another run. Without a readable
    saved config, the checkpoint's own parameter shapes are checked before restoring instead."""
    saved_path = workdir / "config.yaml"
    try:
        saved = read_saved_config(saved_path)
    except ConfigError as e:
        if saved_path.is_file():
            warn(f"the saved config cannot be read ({e}); checking the checkpoint's shapes against this config "
                 "instead, and writing this config in its place")
        else:
            warn(f"{saved_path} is missing; checking the checkpoint's shapes against this config instead")
        return []
    changes = check_resume(saved, cfg, workdir)
    return ["changed on resume: " + ", ".join(str(c) for c in changes)] if changes else []


def _restore_or_init(run: _Run) -> None:
    cfg = run.cfg

    def new_iterator(start_row: int = 0):
        return iter(run.task.train_batches(run.per_process_batch, start_row=start_row))

    def restore(step: int):
        iterator = new_iterator()  # a fresh one per attempt: a failed restore may have touched it
        state, iterator_restored = run.store.restore(step, run.abstract, iterator, run.data_meta)
        return state, iterator, iterator_restored

    found = restore_newest(run.store, run.abstract["params"], restore)
    if found is None:
        run.data_iter = new_iterator()
        if cfg.train.init_from:
            params, note = _initial_params(run)
            run.state = init_state_from_params(run_params(params, cfg), run.tx, run.shardings, cfg.train.seed)
            run.notes.append(f"initialised from {cfg.train.init_from} (fresh optimizer{note})")
        else:
            run.state = init_state(run.task.model, run.tx, run.shardings, cfg.train.seed, run.task.init_input)
        return
    step, (run.state, run.data_iter, iterator_restored) = found
    if not iterator_restored:  # another topology wrote it: continue the same global order
        run.data_iter = new_iterator(start_row=step * cfg.train.global_batch_size)
    run.start_step = step
    run.notes.append(f"resumed from checkpoint step {step}"
                     + ("" if iterator_restored else " (data position rebuilt for this topology)"))


def _initial_params(run: _Run) -> tuple[Any, str]:
    """Parameters of an export/import directory (or a workdir) of the same task, checked against this model's
    shapes, and a note for the header. ParScale's second stage: a model trained with one stream gets fresh stream
    starts and aggregation, everything else from there."""
    cfg, path = run.cfg, run.cfg.train.init_from
    loaded = load_trained(path)
    if loaded.cfg.task != cfg.task:
        raise ConfigError(f"train.init_from={path} holds a model of task {loaded.cfg.task!r}, this run is task "
                          f"{cfg.task!r}; start from a {cfg.task} export")
    ours = param_shapes(plain_abstract(merged_abstract(quantized_as_plain(run.abstract["params"]))))  # the model's own layout
    saved = param_shapes(loaded.params)
    adds_streams = cfg.model.parscale.enabled and not loaded.cfg.model.parscale.enabled  # refused outside LMs
    new = {name for name in ours if name not in saved and adds_streams and is_parscale_param(name)}
    mismatch = shape_mismatch(saved, {name: shape for name, shape in ours.items() if name not in new},
                              saved_name="there")
    if mismatch:
        raise ConfigError(f"train.init_from={path}: {mismatch}; make the model "
                          f"section describe the same model (see {path}/config.json)")
    if not new:
        return jax.device_get(loaded.params), ""  # host arrays: the state is built on this run's mesh
    saved_leaves = {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)  # host: any device set
                    for p, x in jax.tree_util.tree_leaves_with_path(loaded.params)}
    fresh = init_params(run.task.model, run.shardings["params"], cfg.train.seed, run.task.init_input)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: saved_leaves.get(jax.tree_util.keystr(p, simple=True, separator="/"), x), fresh)
    return params, f"; {cfg.model.parscale.streams} ParScale streams added: their {len(new)} parameters start fresh"


def _compile_steps(run: _Run):
    """(train_step, eval_step, compiled or None). Compiled ahead of time: the memory report needs it."""
    cfg, mesh = run.cfg, run.mesh
    quantize = param_quantizer(cfg.train.qat, run.abstract["params"])  # train.qat: fake-quantized weights, else identity
    train_step = make_train_step(on_quantized_params(run.task.loss, quantize), run.tx, learning_rate_schedule(cfg.train),
                                 cfg.train.microbatches)
    eval_step = on_quantized_params(run.task.eval_metrics, quantize)
    eval_step = _on_model_params(eval_step)  # train.zo.frozen_int8: int8 matrices dequantized
    run.notes += qat_notes(cfg.train.qat, run.abstract["params"]) + lora_notes(cfg, run.abstract["params"])
    if not cfg.train.jit:
        return train_step, eval_step, None
    compiled = aot_compile_train_step(train_step, run.abstract, run.shardings, mesh,
                                      run.task.batch_shapes(cfg.train.global_batch_size))
    eval_step = jax.jit(eval_step, in_shardings=(run.shardings["params"], batch_sharding(mesh)),
                        out_shardings=replicated(mesh))
    return compiled, eval_step, compiled


def _on_model_params(fn):
    """fn(params, batch) on the model's own parameter tree (a zeroth-order run may store frozen matrices in int8)."""
    return lambda params, batch: fn(dequantize_params(params), batch)


def _comm_stats(compiled) -> tuple[dict | None, str | None]:
    """(collective statistics of the compiled step or None, a header line or None). A step whose HLO the
    counter cannot read is reported in the header, never stops training."""
    if compiled is None:
        return None, None
    try:
        stats = collective_stats(compiled)
    except ValueError as e:
        return None, f"collectives not counted: {e}"
    return stats, comm_summary(stats)


def _print_header(run: _Run, progress: Progress, compiled, comm_line: str | None = None) -> None:
    n_params = count_params(run.abstract["params"])
    inactive = type(run.task).inactive_params(run.cfg)
    active = f" ({(n_params - inactive) / 1e6:.2f}M active per token)" if inactive else ""
    progress.print(f"jaxeff: {n_params / 1e6:.2f}M params{active}, mesh {dict(run.mesh.shape)} on {run.mesh.size} "
                   f"{run.devices[0].platform} device(s), {run.task.describe()}, workdir {run.workdir}")
    if run.mesh.size > 1:
        boxed = abstract_boxed_state(run.task.model, run.tx, run.cfg.train.seed, run.task.init_input)
        for row in parameter_table(run.abstract["params"], logical_axes(boxed["params"]), run.shardings["params"]):
            progress.print("  " + row)
    progress.print(f"jaxeff: {memory_summary(run.abstract, run.shardings, compiled)}")
    if comm_line:
        progress.print(f"jaxeff: {comm_line}")
    for note in run.notes:
        progress.print(f"jaxeff: {note}")


def _evaluate(run: _Run, eval_step, params) -> dict[str, float]:
    """The task's held-out metrics, averaged over `train.eval_batches` batches ("loss" among them)."""
    batches = run.task.eval_batches(run.per_process_batch, run.cfg.train.eval_batches)
    with (contextlib.nullcontext() if run.cfg.train.jit else jax.disable_jit()):
        values = [jax.device_get(eval_step(params, run.global_batch(b))) for b in batches]
    if not values:
        return {"loss": float("nan")}
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


def train(cfg: Config, workdir: PathLike, *, debug: bool = False, console: bool = True) -> TrainResult:
    """Train (or resume) the run configured by `cfg` in `workdir`. See docs/architecture.md."""
    run = _setup(cfg, workdir, debug)
    tcfg = cfg.train
    if run.start_step >= tcfg.steps:
        return _nothing_to_train(run)
    train_step, eval_step, compiled = _compile_steps(run)
    progress = Progress(tcfg.steps, run.start_step, cfg.logging.progress_bar and console)
    comm, comm_line = _comm_stats(compiled)
    _print_header(run, progress, compiled, comm_line)
    writer = TensorBoardWriter(run.workdir / "tb")
    if comm is not None:  # once per (re)start: what one jitted step exchanges between devices
        writer.scalars(run.start_step, comm_scalars(comm))
    task = run.task
    units_per_step = tcfg.global_batch_size * task.units_per_example()
    flops = task.flops_per_example()
    step_flops = None if flops is None else passes_per_step(tcfg) * flops * tcfg.global_batch_size  # zo: n + 1
    throughput = Throughput(units_per_step, step_flops, run.mesh.size,
                            peak_flops_per_device(cfg.logging.peak_tflops_per_device), task.unit)
    telemetry = StepTelemetry(writer, progress, throughput, start_step=run.start_step, total_steps=tcfg.steps,
                              log_every=cfg.logging.every, max_consecutive_nonfinite=tcfg.max_consecutive_nonfinite)
    eval_losses: dict[int, float] = {}
    state, step, exit_code, run_start = run.state, run.start_step, 0, time.perf_counter()
    step_context = contextlib.nullcontext if tcfg.jit else jax.disable_jit

    # The mesh context lets the models' activation sharding hints apply while steps are traced.
    with jax.set_mesh(run.mesh), PreemptionGuard(run.store.writing_step) as guard:
        try:
            while step < tcfg.steps:
                batch = run.global_batch(next(run.data_iter))
                with step_context():
                    state, metrics = train_step(state, batch)
                step += 1
                telemetry.dispatched(step, metrics)
                if step % tcfg.eval_every == 0 or step == tcfg.steps:
                    telemetry.flush()
                    metrics = _evaluate(run, eval_step, state["params"])
                    eval_losses[step] = metrics["loss"]
                    writer.scalars(step, {"eval_loss": metrics["loss"],
                                          **{f"eval/{k}": v for k, v in metrics.items() if k != "loss"}})
                    progress.print(f"step {step}: eval loss {metrics['loss']:.4f}" + "".join(
                        f", {k} {v:.4g}" for k, v in metrics.items() if k != "loss"))
                    telemetry.restart_interval()  # keep evaluation time out of the step time
                stop = guard.should_stop(step)
                guard.hold_if_finishing()
                if step % cfg.checkpoint.every == 0 or stop:
                    run.store.save(step, state, run.data_iter, run.data_meta)
                if stop:
                    exit_code = guard.exit_code
                    break
            telemetry.flush()
        except TrainingStopped:  # the state holds the last finite parameters: keep them
            run.store.save_final(step, state, run.data_iter, run.data_meta)
            raise
        except BaseException:  # the state may be invalid (donated); finish the saves already under way
            run.store.close()
            raise
        else:
            run.store.save_final(step, state, run.data_iter, run.data_meta)
        finally:
            writer.close()
            progress.close()

    sample = None
    if exit_code:
        progress.print(f"jaxeff: stopped by signal {exit_code - 128} at step {step}; checkpoint saved in "
                       f"{run.store.directory}. Run the same command again to resume.")
    else:
        sample = _sample(run, state["params"], progress)
        elapsed = time.perf_counter() - run_start
        last_eval = eval_losses[max(eval_losses)] if eval_losses else float("nan")
        progress.print(f"jaxeff: done, step {step}, loss {telemetry.losses.get(step, float('nan')):.4f}, eval loss "
                       f"{last_eval:.4f}, {(step - run.start_step) * units_per_step / elapsed:,.0f} {task.unit}/s over "
                       f"{elapsed:.0f}s, checkpoints in {run.store.directory}, TensorBoard: tensorboard --logdir "
                       f"{run.workdir / 'tb'}")
    return TrainResult(step, telemetry.losses, eval_losses, sample, exit_code, state["params"])


def _nothing_to_train(run: _Run) -> TrainResult:
    """The workdir is already at (or past) train.steps: say so, and how to go on."""
    run.store.close()
    done, steps = run.start_step, run.cfg.train.steps
    if done > steps:
        raise ConfigError(f"the workdir {run.workdir} is at step {done}, past train.steps={steps}; to train further "
                          f"set train.steps above {done} (e.g. train.steps={done + steps}), or use a new --workdir")
    if jax.process_index() == 0:
        print(f"jaxeff: the run in {run.workdir} is already complete at step {done} = train.steps; set a larger "
              f"train.steps (e.g. train.steps={2 * done}) to train further", flush=True)
    return TrainResult(done, {}, {}, None, 0, run.state["params"])


def _sample(run: _Run, params, progress: Progress) -> str | None:
    """The task's end-of-training output (a text sample, a test-split forecast table), on process 0."""
    params = dequantize_params(params)  # train.zo.frozen_int8: int8 matrices dequantized
    # Every process joins the gather (parameters may live on other hosts).
    quantize = param_quantizer(run.cfg.train.qat, run.abstract["params"])  # the weights the model runs with
    params = jax.device_get(jax.jit(quantize, out_shardings=replicated(run.mesh))(params))
    if jax.process_index() != 0:
        return None
    return run.task.finish(params, progress)
