"""What running the token mixers' kernel ops per shard (jaxeff.parallel.sharding.per_shard, a shard_map over the
batch and head axes) costs or saves on a multi-device train step, measured side by side in one run.

    python benchmarks/per_shard.py [--steps 10] [--rounds 3] [--write docs/benchmarks.md]

TransNormerLLM debug model (lightning attention, chunked jnp form on CPU) on 8 fake CPU devices, data=4 x tensor=2:
the step with the op inside shard_map (what ships) against the same step with the op called on the global arrays
(what XLA's partitioner then does with it). On GPU/TPU the unwrapped Pallas kernels would not partition at all.
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

import jaxeff.layers.lightning as lightning_layer  # noqa: E402

OVERRIDES = ["mesh.data=4", "mesh.tensor=2", "train.global_batch_size=16"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    shipped = lightning_layer.per_sequence_shard
    variants = {"per shard (shard_map)": build_step(OVERRIDES, "configs/tnl-debug.yaml")}
    # the op on global arrays (this mesh does not split the sequence, so `whole` is the form that ships)
    lightning_layer.per_sequence_shard = lambda whole, sharded, fn_args, in_axes, out_axes: whole(*fn_args)
    try:
        variants["global op (partitioner)"] = build_step(OVERRIDES, "configs/tnl-debug.yaml")
    finally:
        lightning_layer.per_sequence_shard = shipped
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, v in variants.items():
            times[name] += time_steps(v, args.steps)
    base = float(np.median(times["global op (partitioner)"]))
    rows = [f"| {name} | {float(np.median(ts)) * 1e3:.1f} | {float(np.median(ts)) / base:.2f} |"
            for name, ts in times.items()]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}"
    table = "\n".join(["| lightning op | step ms (median) | time vs global op |", "|---|---|---|", *rows])
    print(f"configs/tnl-debug.yaml, {' '.join(OVERRIDES)}, {machine}\n{table}")
    if args.write:
        write_section(args.write, "per-shard", "Kernel ops per shard on a multi-device step (CPU)",
                      f"Measured by `python benchmarks/per_shard.py` on {machine}: configs/tnl-debug.yaml with "
                      f"{' '.join(OVERRIDES)} on 8 fake CPU devices ({args.rounds} rounds x {args.steps} steps, "
                      f"interleaved).\n\n{table}")


if __name__ == "__main__":
    main()
