"""Train-step throughput of the debug model under trainer options, measured side by side in one run.

    python benchmarks/trainer.py [--steps 20] [--write docs/benchmarks.md]

Every variant runs in this one process on the same data, interleaved over several rounds; the table
reports the median step time and the ratio to the baseline. CPU numbers mean little in absolute
terms (fake devices share the cores); the ratios show what an option costs.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxeff.config import load_config  # noqa: E402
from jaxeff.models.lm import build_model  # noqa: E402
from jaxeff.parallel.mesh import build_mesh  # noqa: E402
from jaxeff.parallel.sharding import batch_sharding, replicated  # noqa: E402
from jaxeff.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from jaxeff.train.state import abstract_state_and_shardings, init_state  # noqa: E402
from jaxeff.train.step import make_train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "baseline (1 device, jit)": [],
    "remat=full": ["model.remat=full"],
    "remat=dots_saveable": ["model.remat=dots_saveable"],
    "microbatches=2": ["train.microbatches=2"],
    "8 fake devices data=8": ["mesh.data=8"],
    "8 fake devices data2 fsdp2 tensor2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
}


def build(overrides: list[str]):
    cfg = load_config(REPO / "configs/debug.yaml", ["mesh.data=1", *overrides])
    model = build_model(cfg.model, 259)
    tx = make_optimizer(cfg.train)
    mesh = build_mesh(cfg)
    _, shardings = abstract_state_and_shardings(model, tx, mesh, 0, cfg.data.seq_len)
    state = init_state(model, tx, shardings, 0, cfg.data.seq_len)
    step = jax.jit(make_train_step(model, tx, learning_rate_schedule(cfg.train), cfg.train.microbatches),
                   in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, replicated(mesh)),
                   donate_argnums=0)
    rng = np.random.default_rng(0)
    shape = (cfg.train.global_batch_size, cfg.data.seq_len)
    batch = {k: jax.device_put(rng.integers(0, 256, shape, dtype=np.int32), batch_sharding(mesh))
             for k in ("inputs", "targets")}
    with jax.set_mesh(mesh):
        state, _ = step(state, batch)  # compile
    jax.block_until_ready(state)
    return {"step": step, "state": state, "batch": batch, "tokens": shape[0] * shape[1]}


def time_steps(v, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        v["state"], metrics = v["step"](v["state"], v["batch"])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", type=Path, default=None, help="markdown file to (re)write the table into")
    args = parser.parse_args()
    variants = {name: build(o) for name, o in VARIANTS.items()}
    times = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleave so machine noise hits every variant alike
        for name, v in variants.items():
            times[name] += time_steps(v, args.steps)
    base = np.median(times["baseline (1 device, jit)"])
    rows = []
    for name, ts in times.items():
        med = float(np.median(ts))
        rows.append(f"| {name} | {med * 1e3:.1f} | {variants[name]['tokens'] / med:,.0f} | {med / base:.2f} |")
    header = ("| variant | step ms (median) | tokens/s | time vs baseline |\n|---|---|---|---|")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}"
    table = "\n".join([header, *rows])
    print(f"debug model (configs/debug.yaml, batch 16 x 128), {machine}\n{table}")
    if args.write:
        text = args.write.read_text() if args.write.exists() else "# Benchmarks\n"
        start, end = "<!-- trainer:start -->", "<!-- trainer:end -->"
        block = (f"{start}\nMeasured by `python benchmarks/trainer.py` on {machine} "
                 f"({args.rounds} rounds x {args.steps} steps per variant, interleaved).\n\n{table}\n{end}")
        if start in text:
            text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
        else:
            text += "\n## Trainer step (CPU)\n\n" + block + "\n"
        args.write.write_text(text)


if __name__ == "__main__":
    main()
