"""S2-Attention on CPU: forward + backward time of the xla (gather) impl vs dense causal attention, and KV-cache bytes.

    python benchmarks/s2.py [--lengths 4096 8192 16384 32768] [--write docs/benchmarks.md]

One process, float32, batch 1, 4 query heads / 4 KV heads of width 64, blocks of 64 tokens, local window 4 blocks,
vertical stride 8 (step 2 with 4 heads: residues 0, 2, 4, 6), so each head reads about 4 + n/8 of n blocks.
Dense attention is `jax.nn.dot_product_attention(is_causal=True)` (XLA on CPU materialises the S x S scores; it
is skipped where that passes 4 GB). Cache bytes are per sequence and layer at the end of the sequence: the pruned
per-head cache of jaxeff/layers/s2.py vs a dense KV cache. Each case is warmed up and timed on its own.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import jaxeff  # noqa: E402,F401
import jax  # noqa: E402

from common import bench, fwd_bwd, write_section  # noqa: E402
from pallas_kernels.s2_attention import block_mask, kept_kv_blocks, s2_attention  # noqa: E402

HEADS, DIM, BLOCK, LOCAL, STRIDE = 4, 64, 64, 4, 8
DENSE_LIMIT_BYTES = 4 * 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--write", default=None, metavar="MARKDOWN")
    args = parser.parse_args()
    s2 = fwd_bwd(lambda q, k, v: s2_attention(q, k, v, block_size=BLOCK, local_blocks=LOCAL, vert_stride=STRIDE,
                                              impl="xla"))
    dense = fwd_bwd(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    rows = ["| length | S2 xla fwd+bwd ms | dense fwd+bwd ms | dense / S2 | blocks read per head (of causal) | "
            "KV cache per layer: pruned / dense |", "|---|---|---|---|---|---|"]
    for n in args.lengths:
        q, k, v = (jax.random.normal(jax.random.key(i), (1, n, HEADS, DIM)) for i in range(3))
        t_s2 = bench(s2, (q, k, v), reps=3)
        scores_bytes = 3 * HEADS * n * n * 4  # logits, probabilities and their gradient
        t_dense = bench(dense, (q, k, v), reps=3) if scores_bytes <= DENSE_LIMIT_BYTES else None
        blocks = math.ceil(n / BLOCK)
        mask = block_mask(HEADS, blocks, blocks, local_blocks=LOCAL, vert_stride=STRIDE)
        density = mask.sum() / (HEADS * blocks * (blocks + 1) / 2)
        kept = kept_kv_blocks(mask)
        capacity = LOCAL + math.ceil(blocks / STRIDE)  # slots per head in the pruned cache
        dense_txt = f"{t_dense * 1e3:.0f}" if t_dense else "- (> 4 GB)"
        ratio = f"{t_dense / t_s2:.2f}" if t_dense else "-"
        rows.append(f"| {n} | {t_s2 * 1e3:.0f} | {dense_txt} | {ratio} | {density:.1%} (kept at the end: "
                    f"{int(kept.min())}-{int(kept.max())} of {blocks}) | {capacity}/{blocks} = {capacity / blocks:.1%} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.write:
        write_section(Path(__file__).resolve().parents[1] / args.write, "s2", "S2-Attention vs dense attention (CPU)",
                      "`python benchmarks/s2.py --write docs/benchmarks.md`: batch 1, 4 heads x 64, blocks of 64, "
                      f"local {LOCAL} blocks, vertical stride {STRIDE}, float32, median of 3 after a warm-up.\n\n{table}")


if __name__ == "__main__":
    main()
