"""GPU check and timing of the companion SSM's sequence op: is a Pallas kernel worth writing? (about 1 min)

    python benchmarks/gpu/companion_gpu.py [--write docs/benchmarks.md]

The op's training path is the fast kernel + an FFT convolution (`jnp.fft`). A Pallas kernel would be a chunked
scan: within a chunk a causal Toeplitz matmul with the kernel taps, between chunks the d-sized state carried
with A^C. Its within-chunk part is what tensor cores do well, so the proxy measured here is the whole sequence
as one causal Toeplitz matmul (for lengths where the [D, S, T] matrix fits) next to the FFT path and the
step-by-step `lax.scan` recurrence (up to 16K steps: its per-step cost is flat, and 64K sequential steps forward
and backward would spend tens of seconds of run_all.py's 8-minute budget), forward + backward in float32, 256
channels, state d = 64, 16 kernels.
If the Toeplitz matmul does not beat the FFT path, a Pallas kernel built on it will not either.
1. Correctness on the GPU: FFT path vs the recurrence (relative error).
2. Timing table (printed last).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxeff  # noqa: E402,F401  (XLA work-arounds)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import bench, fwd_bwd, normal, run, shapes, target_device, write_section  # noqa: E402
from pallas_kernels.companion_ssm import causal_conv, companion_kernel  # noqa: E402
from pallas_kernels.companion_ssm.reference import recurrence  # noqa: E402

CHANNELS, D, KERNELS = 256, 64, 16
SHAPES = [(16, 1024), (4, 4096), (1, 16384), (1, 65536)]  # (batch, length)
TOEPLITZ_MAX = 4096
SCAN_MAX = 16384


def params(seed: int = 0):
    a, b, c = normal(jax.random.key(seed), (3, KERNELS, D))
    a = a / jnp.sum(jnp.abs(a), -1, keepdims=True)
    return a, b * D**-0.5, c * D**-0.5


def tile(x):
    return jnp.tile(x, (CHANNELS // KERNELS, 1))


def fft_path(u, a, b, c):
    return causal_conv(u, tile(companion_kernel(a, b, c, u.shape[1])))


def toeplitz_path(u, a, b, c):
    n = u.shape[1]
    k = tile(companion_kernel(a, b, c, n))  # [D, S]: the kernel of each channel
    lag = jnp.arange(n)[:, None] - jnp.arange(n)[None, :]
    t = jnp.where(lag >= 0, k[:, jnp.clip(lag, 0, n - 1)], 0.0)  # [D, S, T]
    return jnp.einsum("hts,bsh->bth", t, u)


def scan_path(u, a, b, c):
    return recurrence(u, tile(a), tile(b), tile(c), jnp.zeros((CHANNELS,)))[0]


PATHS = {"fft": fft_path, "toeplitz": toeplitz_path, "scan": scan_path}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", default=None, metavar="MARKDOWN")
    args = parser.parse_args(argv)
    device = target_device()
    a, b, c = params()
    u = normal(jax.random.key(1), (2, 1000, CHANNELS))
    ref = run(scan_path, u, a, b, c)
    err = float(jnp.max(jnp.abs(run(fft_path, u, a, b, c) - ref)) / jnp.max(jnp.abs(ref)))
    print(f"device: {device.device_kind}; fft vs recurrence, length 1000: max relative error {err:.2e}", flush=True)

    rows = ["| batch x length | fft ms | toeplitz ms | scan ms | toeplitz / fft | scan / fft |", "|---|---|---|---|---|---|"]
    for batch, n in shapes(SHAPES):
        u = normal(jax.random.key(2), (batch, n, CHANNELS))
        times = {}
        for name, path in PATHS.items():
            if (name == "toeplitz" and n > TOEPLITZ_MAX) or (name == "scan" and n > SCAN_MAX):
                continue
            times[name] = bench(fwd_bwd(path, argnums=(0, 1, 2, 3)), (u, a, b, c), reps=5)
            print(f"{batch} x {n} {name}: {times[name] * 1e3:.2f} ms", flush=True)
        f = times["fft"]
        tz = f"{times['toeplitz'] * 1e3:.2f}" if "toeplitz" in times else "-"
        tz_ratio = f"{times['toeplitz'] / f:.2f}" if "toeplitz" in times else "-"
        sc = f"{times['scan'] * 1e3:.2f}" if "scan" in times else "-"
        sc_ratio = f"{times['scan'] / f:.2f}" if "scan" in times else "-"
        rows.append(f"| {batch} x {n} | {f * 1e3:.2f} | {tz} | {sc} | {tz_ratio} | {sc_ratio} |")
    table = "\n".join(rows)
    if args.write:
        body = (f"`python benchmarks/gpu/companion_gpu.py` on {device.device_kind}, jax {jax.__version__}: forward + "
                f"backward, float32, {CHANNELS} channels, d = {D}, {KERNELS} kernels. FFT vs recurrence max relative "
                f"error {err:.1e}.\n\n{table}")
        write_section(Path(__file__).resolve().parents[2] / args.write, "companion-gpu",
                      "Companion SSM on GPU: FFT vs Toeplitz matmul vs scan", body)
    print(table)


if __name__ == "__main__":
    main()
