"""GPU timing of the MoE expert computation: grouped matmul (`jax.lax.ragged_dot`) vs capacity buffers vs a loop.

    python benchmarks/gpu/moe_gpu.py [--write docs/benchmarks.md]

Forward + backward of the experts of one MoE layer, bfloat16, for T token-choices routed to E experts with a
skewed (Zipf-like) load:
  ragged_dot   sorted token-choices, two grouped matmuls (the dropless path of jaxeff/layers/moe.py)
  capacity     the [E, C, P] buffer and two batched einsums (the capacity path; C = 1.25 T / E, padding included)
  loop         one dense matmul per expert over its own rows (a Python loop, E small kernels), and the reference of
               the correctness check; only where E <= 16 (LOOP_MAX_EXPERTS): each expert's row count is a distinct
               matmul shape, compiled (and autotuned on a GPU) on its own, which at E = 64 took ~80 s of compile
               time for an H100 on our CPU host (run_all.py --aot h100)
jaxeff has no Pallas grouped-matmul kernel of its own: upstream megablox is TPU-only; the candidate for GPU is a
Triton/Pallas port of it, to be written only if `ragged_dot` loses to `capacity` here. Prints a table last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxeff  # noqa: E402,F401
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import bench, fwd_bwd, normal, run, shapes, target_device, write_section  # noqa: E402

CASES = [(16384, 64, 1024, 512), (65536, 64, 2048, 1024), (65536, 16, 4096, 2048)]  # (T, E, model width, hidden)
LOOP_MAX_EXPERTS = 16
AOT_CASE = next(i for i, case in enumerate(CASES) if case[1] <= LOOP_MAX_EXPERTS)  # all programs compiled there


def skewed_sizes(tokens: int, experts: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, experts + 1) ** 0.8
    sizes = np.floor(weights / weights.sum() * tokens).astype(np.int32)
    sizes[0] += tokens - sizes.sum()
    return sizes


def ragged(x, w_in, w_out, sizes):
    return jax.lax.ragged_dot(jax.nn.gelu(jax.lax.ragged_dot(x, w_in, sizes)), w_out, sizes)


def capacity_buffers(buf, w_in, w_out):
    return jnp.einsum("ecf,efp->ecp", jax.nn.gelu(jnp.einsum("ecp,epf->ecf", buf, w_in)), w_out)


def make_loop(sizes):
    bounds = np.concatenate([[0], np.cumsum(sizes)])

    def loop(x, w_in, w_out):
        parts = [jax.nn.gelu(x[bounds[e]:bounds[e + 1]] @ w_in[e]) @ w_out[e] for e in range(len(sizes))]
        return jnp.concatenate(parts, 0)

    return loop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", default=None, metavar="MARKDOWN")
    args = parser.parse_args(argv)
    device = target_device()
    rows = ["| T x E, width -> hidden | ragged_dot ms | capacity ms | loop ms | capacity / ragged | loop / ragged |",
            "|---|---|---|---|---|---|"]
    key = jax.random.key(0)
    for t, e, p, f in shapes(CASES, AOT_CASE):
        sizes = skewed_sizes(t, e)
        x = normal(key, (t, p), jnp.bfloat16)
        w_in = normal(key, (e, p, f), jnp.bfloat16) * p**-0.5
        w_out = normal(key, (e, f, p), jnp.bfloat16) * f**-0.5
        c = int(np.ceil(1.25 * t / e))
        buf = normal(key, (e, c, p), jnp.bfloat16)
        check = ""
        if e <= LOOP_MAX_EXPERTS:
            ref = run(make_loop(sizes), x, w_in, w_out)
            err = float(jnp.max(jnp.abs(run(ragged, x, w_in, w_out, jnp.asarray(sizes)).astype(jnp.float32)
                                        - ref.astype(jnp.float32))))
            check = f"(ragged vs loop max abs diff {err:.2e})"
        times = {"ragged": bench(fwd_bwd(lambda x, a, b: ragged(x, a, b, jnp.asarray(sizes))), (x, w_in, w_out), 5),
                 "capacity": bench(fwd_bwd(capacity_buffers), (buf, w_in, w_out), 5)}
        if e <= LOOP_MAX_EXPERTS:
            times["loop"] = bench(fwd_bwd(make_loop(sizes)), (x, w_in, w_out), 5)
        r = times["ragged"]
        loop_ms, loop_ratio = ((f"{times['loop'] * 1e3:.2f}", f"{times['loop'] / r:.2f}") if "loop" in times
                               else ("-", "-"))
        rows.append(f"| {t} x {e}, {p} -> {f} | {r * 1e3:.2f} | {times['capacity'] * 1e3:.2f} | "
                    f"{loop_ms} | {times['capacity'] / r:.2f} | {loop_ratio} |")
        print(rows[-1], check, flush=True)
    table = "\n".join(rows)
    if args.write:
        write_section(Path(__file__).resolve().parents[2] / args.write, "moe-gpu",
                      "MoE grouped matmul on GPU: ragged_dot vs capacity buffers vs loop",
                      f"`python benchmarks/gpu/moe_gpu.py` on {device.device_kind}, jax {jax.__version__}, bfloat16, "
                      f"forward + backward, skewed expert loads.\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
