"""Companion SSM (SpaceTime): kernel computation fast vs krylov vs sequential, and FFT convolution vs a scan.

    python benchmarks/companion.py [--lengths 1024 4096 16384 65536] [--dims 64 256 512] [--write docs/benchmarks.md]

8 heads, float32 on CPU, one process; each case warmed up and repeated on its own. The krylov kernel builds an
[U, X, length] Krylov block and is skipped where that passes 1 GB. The second table runs the whole SSM over
u [1, length, 64 channels] (state d = 64): FFT convolution with the fast kernel vs the step-by-step recurrence.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench  # noqa: E402
from pallas_kernels.companion_ssm import companion_kernel, companion_ssm  # noqa: E402
from pallas_kernels.companion_ssm.reference import recurrence  # noqa: E402

HEADS, CHANNELS, CONV_STATE = 8, 64, 64
KRYLOV_LIMIT_GB = 1.0


def params(h: int, d: int, seed: int = 0):
    a, b, c = jax.random.normal(jax.random.key(seed), (3, h, d))
    return a / jnp.sum(jnp.abs(a), -1, keepdims=True), b, c


def kernel_times(lengths, dims, rounds):
    rows = ["| d | length | fast ms | krylov ms | sequential ms | krylov / fast | sequential / fast |",
            "|---|---|---|---|---|---|---|"]
    for d in dims:
        a, b, c = params(HEADS, d)
        for n in lengths:
            times = {}
            for impl in ("fast", "krylov", "reference"):
                if impl == "krylov" and HEADS * d * n * 4 * 2 / 1e9 > KRYLOV_LIMIT_GB:
                    continue
                fn = jax.jit(lambda a, b, c, impl=impl, n=n: companion_kernel(a, b, c, n, impl=impl))
                times[impl] = bench(fn, (a, b, c), rounds)
                jax.clear_caches()
            fast = times["fast"]
            kry = f"{times['krylov'] * 1e3:.1f}" if "krylov" in times else "skipped (> 1 GB)"
            ratio = f"{times['krylov'] / fast:.1f}" if "krylov" in times else "-"
            rows.append(f"| {d} | {n} | {fast * 1e3:.2f} | {kry} | {times['reference'] * 1e3:.1f} | {ratio} | "
                        f"{times['reference'] / fast:.1f} |")
            print(rows[-1], flush=True)
    return rows


def conv_times(lengths, rounds):
    rows = ["| length | FFT conv ms | scan recurrence ms | scan / FFT |", "|---|---|---|---|"]
    a, b, c = params(CHANNELS, CONV_STATE, seed=1)
    skip = jnp.ones((CHANNELS,))
    for n in lengths:
        u = jax.random.normal(jax.random.key(n), (1, n, CHANNELS))
        fft = bench(jax.jit(lambda u: companion_ssm(u, a, b, c, skip)), (u,), rounds)
        scan = bench(jax.jit(lambda u: recurrence(u, a, b, c, skip)[0]), (u,), rounds)
        rows.append(f"| {n} | {fft * 1e3:.1f} | {scan * 1e3:.1f} | {scan / fft:.1f} |")
        print(rows[-1], flush=True)
        jax.clear_caches()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    kernels = "\n".join(kernel_times(args.lengths, args.dims, args.rounds))
    convs = "\n".join(conv_times(args.lengths, args.rounds))
    machine = f"{platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}"
    print(f"\nkernels, {HEADS} heads, float32, {machine}\n{kernels}\n\nSSM over {CHANNELS} channels, d {CONV_STATE}\n"
          f"{convs}")
    if args.write:
        from common import write_section

        write_section(args.write, "companion-cpu", "Companion SSM kernels and convolution (CPU)",
                      f"Measured by `python benchmarks/companion.py` on {machine} (2 cores; float32, median of "
                      f"{args.rounds} rounds). Kernel computation for {HEADS} heads (a L1-normalised):\n\n{kernels}"
                      f"\n\nThe SSM over u [1, length, {CHANNELS} channels], state {CONV_STATE}, with skip: FFT "
                      f"convolution (fast kernel included) vs the step-by-step recurrence (`lax.scan`):\n\n{convs}")


if __name__ == "__main__":
    main()
