"""Sparse Spectral Training vs full-rank training vs LoRA on the debug model (configs/debug.yaml, CPU).

    python benchmarks/sst.py [--steps 300] [--ranks 8 32] [--write docs/benchmarks.md]

Every run trains the same steps from scratch on the same data with the same schedule and seed; SST factorises, and
LoRA adapts, every mixer projection (the default `layers` of both). LoRA of rank r runs with `freeze: adapted`
(the randomly initialised projections frozen, their adapters, the embedding and the norms trained: the LoRA
baseline of SST's paper) and has r (m + n) trainable entries per matrix, as many as SST's r active pairs update
(SST adds the k singular values). Reported: eval loss at equal steps, the parameters the step updates (the
embedding and norms train fully in every run), and the compiled step's memory per device as the run header prints
it (params, optimizer state, train step temporaries).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from jaxeff.config import load_config  # noqa: E402
from jaxeff.models.lora import is_adapted  # noqa: E402
from jaxeff.models.sst import is_factorised  # noqa: E402
from jaxeff.train import train  # noqa: E402


def updated_per_step(params, rank: int) -> int:
    """Entries the optimizer changes in one step (SST: r active column pairs and all s of each factorised matrix)."""
    total = 0
    for node in jax.tree.leaves(params, is_leaf=lambda x: is_factorised(x) or is_adapted(x)):
        if is_adapted(node):  # LoRA: the adapters; the base is frozen
            total += node["lora_A"].size + node["lora_B"].size
        elif is_factorised(node) and rank:
            k = node["s"].shape[0]
            m, n = math.prod(node["U"].shape[:-1]), math.prod(node["V"].shape[:-1])
            total += min(rank, k) * (m + n) + k
        else:
            total += sum(x.size for x in jax.tree.leaves(node))
    return total


def run(steps: int, eval_every: int, rank: int, method: str = "sst") -> dict:
    overrides = [f"train.steps={steps}", f"train.eval_every={eval_every}", "sample.max_new_tokens=0",
                 "logging.progress_bar=false", "train.eval_batches=8"]
    if method == "sst":
        overrides += [f"train.sst.rank={rank}", "train.sst.resample_every=25", "train.sst.svd_every=100"]
    else:
        overrides += [f"train.lora.rank={rank}", f"train.lora.alpha={2.0 * rank}", "train.lora.freeze=adapted"]
    out = io.StringIO()
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(out):
        t0 = time.perf_counter()
        result = train(load_config(REPO / "configs/debug.yaml", overrides), workdir)
        seconds = time.perf_counter() - t0
    memory = re.search(r"per device: (.*)", out.getvalue()).group(1)
    return {"eval": result.eval_losses, "seconds": seconds, "memory": memory,
            "updated": updated_per_step(result.params, rank), "stored": sum(x.size for x in jax.tree.leaves(result.params))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    eval_every = args.steps // 3
    results = {"full rank (AdamW)": run(args.steps, eval_every, 0)}
    for r in args.ranks:
        results[f"SST r={r}"] = run(args.steps, eval_every, r)
        print(f"SST r={r}: done", flush=True)
        results[f"LoRA r={r}"] = run(args.steps, eval_every, r, "lora")
        print(f"LoRA r={r}: done", flush=True)
    picks = (eval_every, 2 * eval_every, args.steps)
    rows = ["| run | parameters stored | updated per step | eval loss @ " + " | @ ".join(map(str, picks))
            + " | per device (compiled step) | wall s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['stored'] / 1e6:.3f}M | {r['updated'] / 1e6:.3f}M | "
                    + " | ".join(f"{r['eval'][s]:.4f}" for s in picks) + f" | {r['memory']} | {r['seconds']:.0f} |")
    table = "\n".join(rows)
    print(table)
    if args.write:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from common import write_section

        write_section(args.write, "sst", "Sparse Spectral Training vs full rank vs LoRA (CPU, debug model)",
                      f"Measured by `python benchmarks/sst.py --steps {args.steps}`: configs/debug.yaml, the same "
                      "data, schedule and seed; SST on every mixer projection, resample_every 25, svd_every 100; LoRA "
                      "on the same matrices, alpha = 2 r, freeze: adapted (the embedding and norms train in every "
                      "run). Methods: [methods/lora.md](methods/lora.md), "
                      f"[methods/sst.md](methods/sst.md).\n\n{table}")


if __name__ == "__main__":
    main()
