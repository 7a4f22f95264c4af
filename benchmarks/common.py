"""Shared benchmark helpers: build a compiled train step of a config on a mesh, time it."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

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


def timed(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def bench(fn, args, reps: int = 10) -> float:
    """Median seconds of `reps` calls after one warm-up (compile) call."""
    timed(fn, args)
    return float(np.median([timed(fn, args) for _ in range(reps)]))


def fwd_bwd(fn, argnums=(0, 1, 2)):
    """The jitted gradient of sum(fn(...)^2) in float32: one forward + backward of `fn`, the thing to time."""
    return jax.jit(jax.grad(lambda *args: jnp.sum(fn(*args).astype(jnp.float32) ** 2), argnums=argnums))


def max_relative_error(reference, candidate) -> float:
    """max over the leaves of two matching pytrees of max|a - b| / max|a| (GPU scripts' correctness checks)."""
    return max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
               for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(candidate)))


def bench_softmax(grad, q, k, v) -> float:
    """Forward+backward time of causal softmax attention (cuDNN flash attention where it runs, else XLA's).
    `grad(fn)` turns fn(q, k, v) -> output into the jitted gradient to time."""
    try:
        return bench(grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                       implementation="cudnn")), (q, k, v))
    except Exception:  # cuDNN flash attention unavailable for this platform/shape/dtype
        return bench(grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)), (q, k, v))


PALLAS_TABLE_HEADER = ["| batch x seq | pallas fwd+bwd ms | chunked fwd+bwd ms | softmax fwd+bwd ms | chunked / pallas "
                       "| softmax / pallas |", "|---|---|---|---|---|---|"]


def pallas_table_row(label: str, times: dict[str, float]) -> str:
    """One row of the GPU scripts' table from seconds per step of "pallas", "chunked" and "softmax"."""
    p = times["pallas"]
    return (f"| {label} | {p * 1e3:.2f} | {times['chunked'] * 1e3:.2f} | {times['softmax'] * 1e3:.2f} "
            f"| {times['chunked'] / p:.2f} | {times['softmax'] / p:.2f} |")


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
    """(Re)write the block between <!-- name:start --> and <!-- name:end --> in a markdown file."""
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
