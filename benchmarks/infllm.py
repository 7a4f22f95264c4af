"""InfLLM v2: associative recall (dense vs S2 vs InfLLM v2 at equal kept blocks) and the op's forward + backward
time vs dense attention on CPU.

    python benchmarks/infllm.py [--steps 400] [--lengths 1024,2048,4096] [--only 'dense,all S2'] [--write docs/benchmarks.md]

Recall: benchmarks/s2_recall.py's task and model (64 tokens, 4 key-value pairs, 4 layers, d 64, 4 heads, blocks
of 4), all layers of one mixer. Kept blocks per query at the end of the sequence: S2 local 2 + every 4th of 16 =
6; InfLLM v2 init 1 + local 2 + top-k 3 others (topk 4, init counted) = 6, pooled keys of 4 tokens, stride 2,
dense_len 0 (always sparse). Timing: B 1, 8 query heads / 2 KV heads of 64, block 64, pooled keys 32 / 16, init 1,
local 4, topk 8; float32, jit, median of 5 after a warm-up; dense = jax.nn.dot_product_attention (XLA).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import plot_eval_curves, write_section  # noqa: E402
from pallas_kernels.infllm import infllm_attention, selection  # noqa: E402
from pallas_kernels.infllm.reference import kept_fraction  # noqa: E402
from s2_recall import BATCH, PAIRS, SEQ, train_schedule  # noqa: E402

INFLLM = ["model.infllm.block_size=4", "model.infllm.kernel_size=4", "model.infllm.kernel_stride=2",
          "model.infllm.init_blocks=1", "model.infllm.local_blocks=2", "model.infllm.topk=4",
          "model.infllm.dense_len=0", "model.infllm.impl=reference"]
SCHEDULES = {
    "dense": ["[attention]"],
    "all S2 (local 2, stride 4)": ["[s2]"],
    "all InfLLM v2 (init 1, local 2, top-k 3)": ["[infllm]", *INFLLM],
    "hybrid InfLLM v2 / dense": ["[infllm, attention]", *INFLLM],
}
TIMING = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, local_blocks=4, topk=8)


def recall(steps: int, only: str | None = None) -> tuple[str, dict]:
    """(the table, each schedule's eval-loss curve)."""
    rows = ["| schedule | answer loss | recall accuracy | seconds |", "|---|---|---|---|"]
    curves = {}
    for name, overrides in SCHEDULES.items():
        if only and not any(name.startswith(word) for word in only.split(",")):
            continue
        t0 = time.perf_counter()
        loss, acc, curves[name] = train_schedule(overrides, steps)
        rows.append(f"| {name} | {loss:.3f} | {acc:.1%} | {time.perf_counter() - t0:.0f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows), curves


def _time(fn, *args, reps: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def timing(lengths: list[int]) -> str:
    rows = ["| tokens | kept keys | dense fwd+bwd ms | infllm xla fwd+bwd ms | selection only ms | xla / dense |",
            "|---|---|---|---|---|---|"]
    for s in lengths:
        ks = jax.random.split(jax.random.key(s), 3)
        q = jax.random.normal(ks[0], (1, s, 8, 64))
        k, v = (jax.random.normal(x, (1, s, 2, 64)) for x in ks[1:])

        def grad_of(attend):
            return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))

        dense = _time(grad_of(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)), q, k, v)
        sparse = _time(grad_of(lambda q, k, v: infllm_attention(q, k, v, impl="xla", **TIMING)), q, k, v)
        select = jax.jit(lambda q, k: selection(q, k, **TIMING))
        pick = _time(select, q, k)
        kept = float(kept_fraction(select(q, k), TIMING["block_size"]))
        rows.append(f"| {s} | {kept:.0%} | {dense:.1f} | {sparse:.1f} | {pick:.1f} | {sparse / dense:.2f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--only", default=None, help="comma-separated prefixes: run the schedules whose name starts with one")
    parser.add_argument("--write", default=None, metavar="MARKDOWN")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {jax.device_count()} CPU device(s), jax {jax.__version__}"
    time_table = timing([int(x) for x in args.lengths.split(",")])
    recall_table, curves = recall(args.steps, args.only)
    print(time_table, recall_table, sep="\n\n")
    if args.write:
        markdown = Path(__file__).resolve().parents[1] / args.write
        plot_eval_curves(curves, f"associative recall, {SEQ} tokens, {PAIRS} pairs", markdown.parent / "img" /
                         "infllm_recall.png", dpi=110)
        only = f" --only '{args.only}'" if args.only else ""
        body = (f"`python benchmarks/infllm.py --steps {args.steps}{only} --write docs/benchmarks.md` on {machine}.\n\n"
                f"Associative recall (benchmarks/s2_recall.py's task, {SEQ} tokens, {PAIRS} pairs, batch {BATCH}, "
                f"{args.steps} steps; loss and accuracy on the answers of 1024 fresh sequences, chance 1/64); 6 kept "
                "blocks of 4 per query at the end of the sequence for both sparse mixers:\n\n"
                f"{recall_table}\n\n![recall](img/infllm_recall.png)\n\n"
                "Forward + backward of the op on CPU (B 1, 8 / 2 heads of 64, block 64, pooled keys 32 / 16, init 1, "
                "local 4, topk 8; float32; median of 5). The xla form computes every score (masked), so it cannot "
                "beat dense on CPU; the block skipping is the Pallas kernel's, not timed here (no GPU / TPU):\n\n"
                f"{time_table}")
        write_section(markdown, "infllm",
                      "InfLLM v2: recall vs dense and S2, op time (CPU)", body)


if __name__ == "__main__":
    main()
