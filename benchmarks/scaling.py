"""Step time, tokens/s and per-device memory of the debug model over mesh shapes and process counts.

    python benchmarks/scaling.py [--steps 15] [--write docs/benchmarks.md]

Runs every mesh shape on 8 simulated CPU devices in one process, then the same shapes as
2 processes x 4 devices (launch/local.py, gloo collectives over localhost). These are CPU numbers:
the "devices" share 2 cores, so they show the cost of sharding and of collectives, not speed-ups.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MESHES = {
    "data=8": ["mesh.data=8"],
    "fsdp=8": ["mesh.data=1", "mesh.fsdp=8"],
    "data=2 fsdp=4": ["mesh.data=2", "mesh.fsdp=4"],
    "data=4 tensor=2": ["mesh.data=4", "mesh.tensor=2"],
    "data=2 fsdp=2 tensor=2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
}
HERE = Path(__file__).resolve().parent


def measure(steps: int) -> dict[str, dict]:
    """In this process (already set up with its devices, maybe one of several processes)."""
    import jax
    import numpy as np

    from common import build_step, time_steps

    results = {}
    for name, overrides in MESHES.items():
        bench = build_step(overrides)
        times = time_steps(bench, steps)
        med = float(np.median(times))
        results[name] = {"step_ms": med * 1e3, "tokens_per_s": bench["tokens"] / med,
                         "mib_per_device": bench["per_device_bytes"] / 2**20}
        del bench
        jax.clear_caches()
    return results


def worker(steps: int) -> None:
    """Entry point under launch/local.py: join the job, measure, process 0 prints one JSON line."""
    sys.path.insert(0, str(HERE.parent))
    from jaxeff.parallel import distributed

    distributed.initialize(distributed.detect())
    import jax

    results = measure(steps)
    if jax.process_index() == 0:
        print("RESULTS " + json.dumps(results), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps)

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    one = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps)], env=env,
                         capture_output=True, text=True, check=True)
    two = subprocess.run([sys.executable, str(HERE.parent / "launch/local.py"), "--num-processes", "2",
                          "--devices-per-process", "4", "--", sys.executable, __file__, "--worker", "--steps",
                          str(args.steps)], env=dict(os.environ), capture_output=True, text=True, check=True)
    parse = lambda out: json.loads(next(l for l in out.splitlines() if "RESULTS " in l).split("RESULTS ", 1)[1])
    runs = {"1 process x 8 devices": parse(one.stdout), "2 processes x 4 devices": parse(two.stdout)}
    rows = ["| processes x devices | mesh | step ms (median) | tokens/s | MiB per device (params + opt + temps) |",
            "|---|---|---|---|---|"]
    for topology, results in runs.items():
        for mesh, r in results.items():
            rows.append(f"| {topology} | {mesh} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                        f"{r['mib_per_device']:.1f} |")
    table = "\n".join(rows)
    print(table)
    if args.write:
        sys.path.insert(0, str(HERE))
        from common import write_section

        write_section(args.write, "scaling", "Scaling over mesh shapes (CPU, simulated devices)",
                      f"Measured by `python benchmarks/scaling.py` ({args.steps} timed steps per row, debug model, "
                      "batch 16 x 128) on the 2-core development machine. **CPU numbers**: the 8 devices share "
                      "2 cores and the 2 processes talk over localhost gloo, so the table shows what sharding and "
                      "cross-process collectives cost, not speed-ups.\n\n" + table)


if __name__ == "__main__":
    main()
