"""Forward+backward time of lightning attention (chunked) vs softmax attention over sequence length.

    python benchmarks/lightning.py [--lengths 1024 2048 4096 8192 16384] [--write docs/benchmarks.md]

Batch 1, 8 heads, head dim 64, float32 on CPU, all lengths and both ops in one process: first
lightning at every length, then softmax, each case warmed up and repeated on its own. Softmax attention is `jax.nn.dot_product_attention(is_causal=True)`; its S x S score
matrix is skipped where it would not fit in memory (noted in the table).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels.lightning_attention import lightning_attention  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_times  # noqa: E402

HEADS, DIM = 8, 64
SOFTMAX_MEMORY_LIMIT_GB = 10.0  # scores + their gradient + probabilities, float32


def make_fns(seq: int):
    key = jax.random.key(seq)
    q, k, v = (jax.random.normal(kk, (1, seq, HEADS, DIM), jnp.float32) * 0.1 for kk in jax.random.split(key, 3))
    rate = jnp.asarray(2.0 ** -np.arange(1, HEADS + 1), jnp.float32)
    lightning = jax.jit(jax.grad(lambda q, k, v: jnp.sum(lightning_attention(q, k, v, rate, impl="chunked") ** 2),
                                 argnums=(0, 1, 2)))
    softmax = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True) ** 2),
                               argnums=(0, 1, 2)))
    softmax_gb = 3 * HEADS * seq * seq * 4 / 1e9
    fns = {"lightning (chunked)": lightning}
    if softmax_gb <= SOFTMAX_MEMORY_LIMIT_GB:
        fns["softmax"] = softmax
    return fns, (q, k, v)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    med = median_times(make_fns, ("lightning (chunked)", "softmax"), args.lengths, args.rounds)
    first = args.lengths[0]
    rows = ["| seq | lightning fwd+bwd ms | softmax fwd+bwd ms | softmax / lightning | lightning ms per 1K tokens |",
            "|---|---|---|---|---|"]
    for s in args.lengths:
        lt = med[(s, "lightning (chunked)")]
        sm = med.get((s, "softmax"))
        rows.append(f"| {s} | {lt * 1e3:.1f} | " + (f"{sm * 1e3:.1f} | {sm / lt:.2f}" if sm else
                    f"skipped (scores ~{3 * HEADS * s * s * 4 / 1e9:.0f} GB) | -") + f" | {lt * 1e3 / (s / 1024):.1f} |")
    growth = med[(args.lengths[-1], "lightning (chunked)")] / med[(first, "lightning (chunked)")]
    machine = f"{platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}"
    table = "\n".join(rows)
    summary = (f"lightning time grows {growth:.1f}x from {first} to {args.lengths[-1]} tokens "
               f"({args.lengths[-1] / first:.0f}x the length): linear scaling means a flat 'ms per 1K tokens' column.")
    print(f"batch 1, {HEADS} heads, d {DIM}, float32, {machine}\n{table}\n{summary}")
    if args.write:
        from common import write_section

        write_section(args.write, "lightning-cpu", "Lightning attention vs softmax attention (CPU)",
                      f"Measured by `python benchmarks/lightning.py` on {machine} (2 cores; batch 1, {HEADS} heads, "
                      f"head dim {DIM}, float32, forward + backward, median of {args.rounds} rounds).\n\n"
                      f"{table}\n\n{summary}")


if __name__ == "__main__":
    main()
