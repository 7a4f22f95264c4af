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
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import build_step, time_steps, write_section  # noqa: E402

VARIANTS = {
    "baseline (1 device, jit)": [],
    "remat=full": ["model.remat=full"],
    "remat=dots_saveable": ["model.remat=dots_saveable"],
    "microbatches=2": ["train.microbatches=2"],
    "8 fake devices data=8": ["mesh.data=8"],
    "8 fake devices data2 fsdp2 tensor2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "ParScale streams=2 (16 prefix tokens)": ["model.parscale.streams=2", "model.parscale.prefix_tokens=16"],
    "ParScale streams=4 (16 prefix tokens)": ["model.parscale.streams=4", "model.parscale.prefix_tokens=16"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", type=Path, default=None, help="markdown file to (re)write the table into")
    args = parser.parse_args()
    variants = {name: build_step(["mesh.data=1", *o]) for name, o in VARIANTS.items()}
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
        write_section(args.write, "trainer", "Trainer step (CPU)",
                      f"Measured by `python benchmarks/trainer.py` on {machine} "
                      f"({args.rounds} rounds x {args.steps} steps per variant, interleaved).\n\n{table}")

if __name__ == "__main__":
    main()
