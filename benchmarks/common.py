"""Shared benchmark helpers: build a compiled train step of a config on a mesh, time it.

Compile-only ("AOT") mode, for the GPU scripts' dry run on a host without the GPU (`benchmarks/gpu/run_all.py
--aot h100`): `set_aot_device(device)` with a compile-only device (jaxeff.parallel.hardware) makes `run`, `bench`
and `timed` compile each program for that device instead of running it. `run` then returns zeros of the output
shapes and dtypes (so a script's checks and tables still run), `bench`/`timed` return nan, `shapes(cases)` keeps
only the first case and `write_section` writes nothing. Outside AOT mode all of them behave as before.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from jaxeff.config import load_config
from jaxeff.tasks.lm import lm_loss
from jaxeff.models.lm import build_model
from jaxeff.parallel.mesh import build_mesh
from jaxeff.parallel.report import tree_bytes_per_device
from jaxeff.parallel.sharding import batch_sharding, replicated
from jaxeff.train.optimizer import learning_rate_schedule, make_optimizer
from jaxeff.train.state import abstract_state_and_shardings, init_state
from jaxeff.train.step import make_train_step

REPO = Path(__file__).resolve().parents[1]


def build_step(overrides: list[str], config: str = "configs/debug.yaml") -> dict:
    """Compile the train step of `config` + overrides on all visible devices; one warm-up step."""
    cfg = load_config(REPO / config, overrides)
    model = build_model(cfg.model, 259)
    tx = make_optimizer(cfg.train)
    mesh = build_mesh(cfg)
    init_input = jax.ShapeDtypeStruct((1, cfg.data.seq_len), np.int32)
    abstract, shardings = abstract_state_and_shardings(model, tx, mesh, 0, init_input)
    state = init_state(model, tx, shardings, 0, init_input)
    shape = (cfg.train.global_batch_size, cfg.data.seq_len)
    batch_abstract = jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding(mesh))
    with jax.set_mesh(mesh):
        step = jax.jit(make_train_step(functools.partial(lm_loss, model), tx, learning_rate_schedule(cfg.train), cfg.train.microbatches),
                       in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, replicated(mesh)),
                       donate_argnums=0).lower(abstract, {"inputs": batch_abstract, "targets": batch_abstract}).compile()
    # Each process supplies its rows of one fixed random batch.
    rows = np.random.default_rng(0).integers(0, 256, shape, dtype=np.int32)
    local = rows[jax.process_index() :: jax.process_count()]
    batch = {k: jax.make_array_from_process_local_data(batch_sharding(mesh), local, shape)
             for k in ("inputs", "targets")}
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    memory = step.memory_analysis()
    per_device_bytes = (tree_bytes_per_device(abstract["params"], shardings["params"])
                        + tree_bytes_per_device(abstract["opt_state"], shardings["opt_state"])
                        + (memory.temp_size_in_bytes if memory is not None else 0))
    return {"step": step, "state": state, "batch": batch, "tokens": shape[0] * shape[1], "mesh": dict(mesh.shape),
            "per_device_bytes": per_device_bytes}


def time_steps(bench: dict, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        bench["state"], metrics = bench["step"](bench["state"], bench["batch"])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return times


AOT_DEVICE = None  # a compile-only device: compile, never run (set by benchmarks/gpu/run_all.py --aot)
AOT_MEMORY_BYTES: int | None = None  # device memory a program may use there (jax's GPU pool), None: unchecked
AOT_ALL_SHAPES = False  # AOT mode at every shape of the real run (its compile-time share), not only the first
AOT_COMPILES: list[tuple[str, float]] = []  # (program, seconds) of every compile in AOT mode, in order


def set_aot_device(device, memory_bytes: int | None = None) -> None:
    """Compile-only mode for `device` (None: back to running on the local devices); a program needing more than
    `memory_bytes` (arguments + outputs + temporaries) raises AotOutOfMemory, as it would fail on the device."""
    global AOT_DEVICE, AOT_MEMORY_BYTES
    AOT_DEVICE, AOT_MEMORY_BYTES = device, memory_bytes


class AotOutOfMemory(RuntimeError):
    """A program compiled in AOT mode needs more device memory than the device gives."""


def aot() -> bool:
    return AOT_DEVICE is not None


def target_device():
    """The device the numbers are for: the compile-only device in AOT mode, else the first local device."""
    return AOT_DEVICE if aot() else jax.devices()[0]


def shapes(cases: list, aot_case: int = 0) -> list:
    """A script's shape list: all of it, or in AOT mode only its case `aot_case` (the first; each program compiled
    once, at a case where all of them run)."""
    return [cases[aot_case]] if aot() and not AOT_ALL_SHAPES else list(cases)


def normal(key, shape, dtype=jnp.float32):
    """`jax.random.normal(key, shape, dtype)`; zeros in AOT mode, where no value is used (a multi-GB random input
    on the CPU would cost more than compiling)."""
    return jnp.zeros(shape, dtype) if aot() else jax.random.normal(key, shape, dtype)


def compile_for_target(fn, args) -> object:
    """Compile `fn` (jitted or not) for the AOT device at the shapes/dtypes of `args`; returns the output's
    ShapeDtypeStructs. Compile errors propagate, and AotOutOfMemory is raised where the compiled program would not
    fit (as both would at the first call on the device)."""
    sharding = SingleDeviceSharding(AOT_DEVICE)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a), sharding=sharding),
                            tuple(args))
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    t0 = time.perf_counter()
    traced = jitted.trace(*abstract)
    memory = traced.lower().compile().memory_analysis()
    seconds = time.perf_counter() - t0
    shapes_text = ", ".join(f"{a.dtype}{list(a.shape)}" for a in jax.tree.leaves(abstract))
    need = 0 if memory is None else (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                     + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    AOT_COMPILES.append((f"{need / 2**30:.1f} GiB {traced.fun_name}({shapes_text})", seconds))
    if AOT_MEMORY_BYTES is not None and need > AOT_MEMORY_BYTES:
        raise AotOutOfMemory(f"{traced.fun_name}({shapes_text}) needs {need / 2**30:.1f} GiB of device memory, "
                             f"more than the {AOT_MEMORY_BYTES / 2**30:.1f} GiB jax gives it on the "
                             f"{AOT_DEVICE.device_kind}")
    return traced.out_info


def run(fn, *args):
    """`jax.jit(fn)(*args)`; in AOT mode `fn` is compiled for the AOT device instead and zeros of its output's
    shapes and dtypes come back."""
    if not aot():
        return jax.jit(fn)(*args)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), compile_for_target(fn, args))


def timed(fn, args) -> float:
    """Seconds of one call of `fn` (nan in AOT mode: compiled only)."""
    if aot():
        compile_for_target(fn, args)
        return math.nan
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def bench(fn, args, reps: int = 10) -> float:
    """Median seconds of `reps` calls after one warm-up (compile) call (nan in AOT mode: compiled once)."""
    if aot():
        return timed(fn, args)
    timed(fn, args)
    return float(np.median([timed(fn, args) for _ in range(reps)]))


def fwd_bwd(fn, argnums=(0, 1, 2)):
    """The jitted gradient of sum(fn(...)^2) in float32: one forward + backward of `fn`, the thing to time."""
    def loss(*args):
        return jnp.sum(fn(*args).astype(jnp.float32) ** 2)

    loss.__name__ = f"fwd_bwd_{getattr(fn, '__name__', 'fn')}"  # names the program in AOT logs
    return jax.jit(jax.grad(loss, argnums=argnums))


def max_relative_error(reference, candidate) -> float:
    """max over the leaves of two matching pytrees of max|a - b| / max|a| (GPU scripts' correctness checks)."""
    return max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
               for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(candidate)))


def gpu_script_start(description: str, argv: list[str] | None, check, what: str = "pallas vs reference"):
    """A GPU script's first steps: (args with --write parsed from `argv`, the target device, the error its `check()`
    returns), and the line that reports them."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--write", default=None, metavar="MARKDOWN")
    args = parser.parse_args(argv)
    device = target_device()
    err = check()
    print(f"device: {device.device_kind}; {what} max relative error {err:.2e}", flush=True)
    return args, device, err


def attention_pallas_error(attention, **settings) -> float:
    """Max relative error of `attention(q, k, v, impl="pallas", **settings)` against impl="reference", forward and
    the three gradients, float32: 2 x 1000 tokens (ragged against 64-token blocks), 8 query / 2 KV heads of 64."""
    keys = jax.random.split(jax.random.key(0), 4)
    q = normal(keys[0], (2, 1000, 8, 64), jnp.float32)
    k, v = (normal(kk, (2, 1000, 2, 64), jnp.float32) for kk in keys[1:3])
    ct = normal(keys[3], q.shape)

    def loss(impl):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl, **settings) * ct),
                                  argnums=(0, 1, 2))

    return max_relative_error(run(loss("reference"), q, k, v), run(loss("pallas"), q, k, v))


def bench_softmax(grad, q, k, v, reps: int = 10) -> float:
    """Forward+backward time of causal softmax attention (cuDNN flash attention where it runs, else XLA's).
    `grad(fn)` turns fn(q, k, v) -> output into the jitted gradient to time."""
    try:
        return bench(grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                       implementation="cudnn")), (q, k, v), reps)
    except Exception as e:  # cuDNN flash attention unavailable for this platform/shape/dtype
        if aot():
            print(f"aot: cuDNN attention did not compile ({first_line(e)}); XLA attention instead", flush=True)
        return bench(grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)), (q, k, v), reps)


def bench_softmax_or_none(grad, q, k, v, label: str, reps: int = 10) -> float | None:
    """bench_softmax, or None (reported) where it fails, e.g. out of memory: without cuDNN (head dim > 128) XLA's
    attention holds the whole [B, H, S, S] score matrix, 81 GiB for mLSTM's 4 x 16384 shape."""
    try:
        return bench_softmax(grad, q, k, v, reps)
    except Exception as e:
        print(f"softmax at {label}: {first_line(e)}", flush=True)
        return None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


PALLAS_TABLE_HEADER = ["| batch x seq | pallas fwd+bwd ms | chunked fwd+bwd ms | softmax fwd+bwd ms | chunked / pallas "
                       "| softmax / pallas |", "|---|---|---|---|---|---|"]


def pallas_table_row(label: str, times: dict[str, float]) -> str:
    """One row of the GPU scripts' table from seconds per step of "pallas", "chunked" and "softmax" (None: "-")."""
    p, s = times["pallas"], times["softmax"]
    return (f"| {label} | {p * 1e3:.2f} | {times['chunked'] * 1e3:.2f} | {'-' if s is None else f'{s * 1e3:.2f}'} "
            f"| {times['chunked'] / p:.2f} | {'-' if s is None else f'{s / p:.2f}'} |")


def median_times(make_fns, names, lengths, rounds: int) -> dict[tuple[int, str], float]:
    """(length, name) -> median seconds. `make_fns(length) -> ({name: jitted fn}, args)`; a name left out of the
    dict (e.g. too big for memory) is skipped. Op by op, length by length, each with its own warm-up: timing
    anything right after a multi-GB case measured the allocator, not the op."""
    times = {}
    for name in names:
        for s in lengths:
            fns, args = make_fns(s)
            if name in fns:
                times[(s, name)] = bench(fns[name], args, rounds)
            del fns, args
            jax.clear_caches()
    return times


def write_section(path: Path, name: str, title: str, body: str) -> None:
    """(Re)write the block between <!-- name:start --> and <!-- name:end --> in a markdown file (not in AOT mode:
    nothing was measured)."""
    if aot():
        print(f"aot: not writing section {name!r} of {path}", flush=True)
        return
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n## {title}\n\n{block}\n"
    path.write_text(text)


def plot_eval_curves(curves: dict[str, dict[int, float]], title: str, out: Path, dpi: int = 120) -> None:
    """Eval loss against step, one line per model (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), marker="o", markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
