"""Issue 20's two comparisons at debug size, each side by side on the same data, optimizer and seed:

1. ParScale (`model.parscale`): the debug attention model (configs/debug.yaml) with P = 1, 2, 4 streams, and a
   dense model (P = 1) widened to about the training FLOPs per token of P = 4;
2. OpenELM's layer-wise scaling (configs/openelm-debug.yaml) vs a uniform model of nearly the same parameters.

    python benchmarks/parscale.py [--steps 210] [--eval-every 35] [--only parscale|layers]
                                  [--write docs/benchmarks.md]

Byte-level stdlib corpus, batch 16 x 128, one run each (seed 0). Every row reports parameters, forward FLOPs per
token (`jaxeff.models.lm.flops_per_token`, what the run header's ratio and MFU use), eval loss at 1/3, 2/3 and all
steps, wall seconds (compile, evals and checkpoints included) and the compiled train step's temporaries per device
(the figure the run header prints as "train step temporaries"). Eval curves go to docs/img/parscale_quality.png
and docs/img/layer_scaling_quality.png (needs matplotlib).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402

import jaxeff.train.loop as train_loop  # noqa: E402
from jaxeff.config import load_config  # noqa: E402
from jaxeff.data.tokenizer import load_tokenizer  # noqa: E402
from jaxeff.models.lm import flops_per_token  # noqa: E402
from jaxeff.train import train  # noqa: E402

PREFIX = "model.parscale.prefix_tokens=16"
# d_model 256 (head width 32 as debug.yaml), 4 layers, SwiGLU 832: 7.15M forward FLOPs per token vs P = 4's 7.18M.
DENSE_WIDE = ["model.d_model=256", "model.n_heads=8", "model.n_kv_heads=4", "model.mlp_dim=832"]
# openelm-debug.yaml's shape with every layer alike: 8 query heads, 2 KV heads, SwiGLU 288 (960,320 parameters vs
# the layer-scaled 964,416, and 2.115M vs 2.107M FLOPs per token).
UNIFORM = ["model.layer_scaling.kind=none", "model.n_heads=8", "model.n_kv_heads=2", "model.mlp_dim=288"]

GROUPS = {
    "parscale": {
        "title": "ParScale: P streams vs dense at equal FLOPs (CPU)",
        "plot": "parscale_quality.png",
        "runs": [("P = 1 (debug.yaml)", "configs/debug.yaml", []),
                 ("P = 2, 16 prefix tokens", "configs/debug.yaml", ["model.parscale.streams=2", PREFIX]),
                 ("P = 4, 16 prefix tokens", "configs/debug.yaml", ["model.parscale.streams=4", PREFIX]),
                 ("dense d 256, SwiGLU 832 (FLOPs of P = 4)", "configs/debug.yaml", DENSE_WIDE)],
    },
    "layers": {
        "title": "Layer-wise scaling (OpenELM) vs uniform layers (CPU)",
        "plot": "layer_scaling_quality.png",
        "runs": [("layer-wise (openelm-debug.yaml)", "configs/openelm-debug.yaml", []),
                 ("uniform: 8 heads, SwiGLU 288", "configs/openelm-debug.yaml", UNIFORM)],
    },
}

_compiled = []


def _recording_memory_summary(abstract_state, shardings, compiled=None, _summary=train_loop.memory_summary):
    """The loop's header line, unchanged; keeps the compiled train step whose memory it reports."""
    _compiled.append(compiled)
    return _summary(abstract_state, shardings, compiled)


train_loop.memory_summary = _recording_memory_summary


def run_one(config: str, extra: list[str], steps: int, eval_every: int) -> dict:
    overrides = [f"train.steps={steps}", f"train.eval_every={eval_every}", "train.eval_batches=8",
                 f"checkpoint.every={steps}", "sample.max_new_tokens=0", "logging.progress_bar=false", *extra]
    cfg = load_config(REPO / config, overrides)
    vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    _compiled.clear()
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        result = train(cfg, workdir)
        seconds = time.perf_counter() - t0
    memory = _compiled[-1].memory_analysis() if _compiled and _compiled[-1] is not None else None
    return {"curve": result.eval_losses, "seconds": seconds,
            "params": sum(x.size for x in jax.tree.leaves(result.params)),
            "flops": flops_per_token(cfg.model, vocab, cfg.data.seq_len),
            "temp_bytes": None if memory is None else memory.temp_size_in_bytes}


def table(results: dict[str, dict], steps: int) -> str:
    marks = (steps // 3, 2 * steps // 3, steps)
    base_flops = next(iter(results.values()))["flops"]
    rows = ["| model | parameters | forward FLOPs / token | eval loss @ " + " | @ ".join(map(str, marks))
            + " | wall s | step temporaries MiB |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        curve = r["curve"]
        picks = [curve[min(curve, key=lambda s: abs(s - t))] for t in marks]
        memory = "-" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
        rows.append(f"| {name} | {r['params']:,} | {r['flops'] / 1e6:.2f}M ({r['flops'] / base_flops:.2f}x) | "
                    + " | ".join(f"{v:.4f}" for v in picks) + f" | {r['seconds']:.0f} | {memory} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=210)
    parser.add_argument("--eval-every", type=int, default=35)
    parser.add_argument("--only", choices=list(GROUPS), default=None)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    from common import plot_eval_curves, write_section

    t_all = time.perf_counter()
    for key, group in GROUPS.items():
        if args.only and key != args.only:
            continue
        results = {}
        for name, config, extra in group["runs"]:
            results[name] = r = run_one(config, extra, args.steps, args.eval_every)
            print(f"{name}: {r['params']:,} params, {r['flops'] / 1e6:.2f}M FLOPs/token, final eval loss "
                  f"{r['curve'][max(r['curve'])]:.4f}, {r['seconds']:.0f}s", flush=True)
        plot_eval_curves({n: r["curve"] for n, r in results.items()},
                         f"stdlib bytes, batch 16 x 128, {args.steps} steps", REPO / "docs/img" / group["plot"])
        text = table(results, args.steps)
        print(text, flush=True)
        if args.write:
            command = (f"python benchmarks/parscale.py --steps {args.steps} --eval-every {args.eval_every}"
                       + (f" --only {key}" if args.only else ""))
            write_section(args.write, f"{key}-quality", group["title"],
                          f"Measured by `{command}` on x86_64, 2 shared cores, jax {jax.__version__}: byte-level "
                          "stdlib corpus, batch 16 x 128, same optimizer and schedule, one run each (seed 0). FLOPs "
                          "are forward matmul FLOPs per token (x first row); temporaries are the compiled train "
                          f"step's, per device.\n\n{text}\n\n![eval loss curves](img/{group['plot']})")
    print(f"total {time.perf_counter() - t_all:.0f}s", flush=True)


if __name__ == "__main__":
    main()
