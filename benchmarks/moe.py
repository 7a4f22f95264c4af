"""Mixture of experts on 8 simulated CPU devices: step time and all-to-all bytes per structure, and a quality run.

    python benchmarks/moe.py [--steps 10] [--rounds 3] [--write docs/benchmarks.md]
    python benchmarks/moe.py --quality [--quality-steps 600] [--write docs/benchmarks.md]

Table 1 (one process, variants interleaved over rounds, median step time): the MoE layers of
configs/moe-debug.yaml (every other layer; 16 experts, top-4) as cdac, dcca with r = 1/4 and r = 1/2, and
residual MoE, on mesh data 2 x expert 4; dropless vs capacity dispatch on data 8 (no expert parallelism); and the
dense SwiGLU model as the reference. The expert parameters a token uses are equal for cdac and both dcca
variants (2 r h^2 per expert x top-4). All-to-all bytes are read from the compiled step
(`jaxeff.parallel.collectives`). CPU "devices" share two cores: the step times show compute overheads, not the
network savings that BigMac targets; the bytes column is what a real interconnect would carry.

Quality (`--quality`): dense (configs/debug.yaml) vs fine-grained MoE (configs/moe-debug.yaml) vs BigMac
(configs/bigmac-debug.yaml) trained the same steps on one device; eval-loss curves to docs/img/moe_quality.png.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jaxeff  # noqa: E402,F401  (XLA work-arounds before JAX starts)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import build_step, plot_eval_curves, time_steps, write_section  # noqa: E402
from jaxeff.config import load_config  # noqa: E402
from jaxeff.parallel.collectives import collective_stats  # noqa: E402

EP = ["mesh.data=2", "mesh.expert=4"]
VARIANTS = {  # name -> (config, overrides)
    "dense SwiGLU (debug.yaml), data 8": ("configs/debug.yaml", ["mesh.data=8"]),
    "cdac, data 2 x expert 4": ("configs/moe-debug.yaml", EP),
    "dcca r=1/4, data 2 x expert 4": ("configs/moe-debug.yaml", EP + ["model.moe.structure=dcca"]),
    "dcca r=1/2 (expert_dim 64), data 2 x expert 4": (
        "configs/moe-debug.yaml", EP + ["model.moe.structure=dcca", "model.moe.ratio=0.5", "model.moe.expert_dim=64"]),
    "residual (top-1, expert_dim 32), data 2 x expert 4": (
        "configs/moe-debug.yaml", EP + ["model.moe.structure=residual", "model.moe.top_k=1", "model.moe.expert_dim=32"]),
    "cdac capacity, data 8": ("configs/moe-debug.yaml", ["mesh.data=8"]),
    "cdac dropless, data 8": ("configs/moe-debug.yaml", ["mesh.data=8", "model.moe.capacity_factor=null"]),
}


def active_expert_params(cfg) -> int:
    """Expert weights one token uses in one MoE layer (top-k experts; plus dcca's shared projections / residual's
    dense MLP and mixer)."""
    m, sec = cfg.model, cfg.model.moe
    if "moe" not in m.channel_mixer_pattern:
        return 0
    width = sec.low_dim(m.d_model) if sec.structure == "dcca" else m.d_model
    n = sec.top_k * 2 * width * sec.hidden_dim(m.d_model, m.mlp_dim) + m.d_model * sec.experts_in_layer(0)
    if sec.structure == "dcca":
        n += 2 * m.d_model * width
    if sec.structure == "residual":
        n += 2 * m.d_model * m.mlp_dim + 2 * m.d_model
    return n


def comm_table(steps: int, rounds: int) -> str:
    benches, a2a, active = {}, {}, {}
    for name, (config, overrides) in VARIANTS.items():
        benches[name] = build_step(overrides, config)
        stats = collective_stats(benches[name]["step"])
        a2a[name] = stats.get("all-to-all", {"bytes": 0})["bytes"]
        active[name] = active_expert_params(load_config(REPO / config, overrides))
        print(f"compiled {name}: all-to-all {a2a[name] / 2**20:.3f} MiB/step/device", flush=True)
    times = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, bench in benches.items():
            times[name] += time_steps(bench, steps)
    step_ms = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
    base = "cdac, data 2 x expert 4"
    rows = ["| variant | step ms | / cdac | all-to-all MiB per step per device | / cdac | active expert params per "
            "token per MoE layer |", "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        ratio = f"{a2a[name] / a2a[base]:.3f}" if a2a[base] and a2a[name] else "-"
        rows.append(f"| {name} | {step_ms[name]:.1f} | {step_ms[name] / step_ms[base]:.2f} | "
                    f"{a2a[name] / 2**20:.3f} | {ratio} | {active[name]:,} |")
    return "\n".join(rows)


def quality(steps: int) -> tuple[str, dict]:
    from jaxeff.train import train

    models = {"dense SwiGLU (debug.yaml)": "configs/debug.yaml", "fine-grained MoE (moe-debug.yaml)":
              "configs/moe-debug.yaml", "BigMac (bigmac-debug.yaml)": "configs/bigmac-debug.yaml"}
    curves, rows = {}, ["| model | params | final eval loss | seconds |", "|---|---|---|---|"]
    for name, config in models.items():
        overrides = [f"train.steps={steps}", "train.eval_every=50", "sample.max_new_tokens=0",
                     "logging.progress_bar=false", "train.eval_batches=8", "mesh.data=1"]
        with tempfile.TemporaryDirectory() as workdir:
            t0 = time.perf_counter()
            result = train(load_config(REPO / config, overrides), workdir, console=False)
            seconds = time.perf_counter() - t0
        curves[name] = result.eval_losses
        n_params = sum(x.size for x in jax.tree.leaves(result.params))
        rows.append(f"| {name} | {n_params / 1e6:.3f}M | {result.eval_losses[steps]:.4f} | {seconds:.0f} |")
        print(rows[-1], flush=True)

    plot_eval_curves(curves, f"stdlib bytes, batch 16 x 128, {steps} steps, one CPU device",
                     REPO / "docs/img/moe_quality.png", dpi=110)
    return "\n".join(rows), curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quality", action="store_true", help="run the quality comparison instead")
    parser.add_argument("--quality-steps", type=int, default=600)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    if args.quality:
        table, _ = quality(args.quality_steps)
        print(table)
        if args.write:
            write_section(REPO / args.write, "moe-quality", "Quality: dense vs fine-grained MoE vs BigMac (CPU)",
                          f"`python benchmarks/moe.py --quality --write docs/benchmarks.md`: byte-level stdlib corpus, "
                          f"{args.quality_steps} steps, batch 16 x 128, same optimiser; MoE in every other layer.\n\n"
                          f"{table}\n\n![MoE quality](img/moe_quality.png)")
        return
    table = comm_table(args.steps, args.rounds)
    print(table)
    if args.write:
        write_section(REPO / args.write, "moe", "Mixture of experts: structures, all-to-all bytes, step time (CPU)",
                      f"`python benchmarks/moe.py --write docs/benchmarks.md`: 8 simulated CPU devices on 2 cores, "
                      f"median of {args.rounds} x {args.steps} steps per variant, interleaved. All-to-all bytes from "
                      "the compiled step (dispatch + combine, forward + backward, float32). CPU devices share the "
                      "cores, so step times show compute overheads only.\n\n" + table)


if __name__ == "__main__":
    main()
