"""Forward+backward time of the mLSTM cell, chunked vs its quadratic form, and softmax attention, over length.

    python benchmarks/mlstm.py [--lengths 1024 2048 4096 8192 16384] [--write docs/benchmarks.md]

Batch 1, 4 heads, d_qk 64, d_v 128 (xLSTM's d_qk = d_v / 2), float32 on CPU, all in one process; each case is
warmed up and repeated on its own. The quadratic mLSTM and softmax attention build S x S matrices: skipped where
those would not fit in memory (noted in the table).
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
from common import median_times  # noqa: E402
from pallas_kernels.mlstm import mlstm  # noqa: E402

HEADS, D_QK, D_V, CHUNK = 4, 64, 128, 64
MEMORY_LIMIT_GB = 8.0
NAMES = ("mLSTM chunked", "mLSTM quadratic", "softmax")


def quadratic_gb(seq: int) -> float:
    return 6 * HEADS * seq * seq * 4 / 1e9  # log-weights, weights, scores and their gradients, float32


def make_fns(seq: int):
    keys = jax.random.split(jax.random.key(seq), 5)
    q, k = (jax.random.normal(kk, (1, seq, HEADS, D_QK)) for kk in keys[:2])
    v = jax.random.normal(keys[2], (1, seq, HEADS, D_V))
    i = jax.random.normal(keys[3], (1, seq, HEADS)) - 5.0
    f = jax.random.normal(keys[4], (1, seq, HEADS)) + 3.0

    def cell(impl):
        loss = lambda q, k, v, i, f: jnp.sum(mlstm(q, k, v, i, f, impl=impl, chunk_size=CHUNK) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))

    v_qk = v[..., :D_QK]  # softmax attention with the same q, k and a d_qk-wide v
    softmax = jax.jit(jax.grad(lambda q, k, v, i, f: jnp.sum(
        jax.nn.dot_product_attention(q, k, v_qk, is_causal=True) ** 2), argnums=(0, 1)))
    fns = {"mLSTM chunked": cell("chunked")}
    if quadratic_gb(seq) <= MEMORY_LIMIT_GB:
        fns["mLSTM quadratic"] = cell("reference")
        fns["softmax"] = softmax
    return fns, (q, k, v, i, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    med = median_times(make_fns, NAMES, args.lengths, args.rounds)
    rows = ["| seq | chunked ms | quadratic ms | softmax ms | quadratic / chunked | softmax / chunked | chunked ms per 1K |",
            "|---|---|---|---|---|---|---|"]
    for s in args.lengths:
        ch = med[(s, "mLSTM chunked")]
        qd, sm = med.get((s, "mLSTM quadratic")), med.get((s, "softmax"))
        skipped = f"skipped (~{quadratic_gb(s):.0f} GB)"
        rows.append(f"| {s} | {ch * 1e3:.0f} | " + (f"{qd * 1e3:.0f}" if qd else skipped) + " | "
                    + (f"{sm * 1e3:.0f}" if sm else skipped) + " | " + (f"{qd / ch:.2f}" if qd else "-") + " | "
                    + (f"{sm / ch:.2f}" if sm else "-") + f" | {ch * 1e3 / (s / 1024):.1f} |")
    machine = f"{platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}"
    table = "\n".join(rows)
    growth = med[(args.lengths[-1], "mLSTM chunked")] / med[(args.lengths[0], "mLSTM chunked")]
    summary = (f"chunked mLSTM time grows {growth:.1f}x from {args.lengths[0]} to {args.lengths[-1]} tokens "
               f"({args.lengths[-1] / args.lengths[0]:.0f}x the length).")
    print(f"batch 1, {HEADS} heads, d_qk {D_QK}, d_v {D_V}, chunk {CHUNK}, float32, {machine}\n{table}\n{summary}")
    if args.write:
        from common import write_section

        write_section(args.write, "mlstm-cpu", "mLSTM: chunked vs quadratic vs softmax attention (CPU)",
                      f"Measured by `python benchmarks/mlstm.py` on {machine} (2 cores; batch 1, {HEADS} heads, "
                      f"d_qk {D_QK}, d_v {D_V}, chunk {CHUNK}, float32, forward + backward, median of {args.rounds} "
                      f"rounds; softmax attention uses the same q, k and a {D_QK}-wide v).\n\n{table}\n\n{summary}")


if __name__ == "__main__":
    main()
