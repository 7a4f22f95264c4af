"""Sequence parallelism (`mesh.sequence`): how long a row each token mixer can train at a fixed memory budget per
device, on one device and split over 8; the step-time ratio; and `jaxeff plan` of ~1B models at 128K and 1M tokens.

    python benchmarks/sequence_parallel.py [--budget-mib 512] [--plans] [--write docs/benchmarks.md]

Part 1 (8 simulated CPU devices, compile only): for each mixer, a small model (d_model 128, 2 layers, 4 heads, one
row per step) is compiled at doubling lengths; a length fits when the step's peak per device (arguments + outputs
- donated + temporaries, from `compiled.memory_analysis()`, as `jaxeff plan` counts it) is within the budget. The
longest fitting length on 1 device and on `mesh.sequence=8`, and their ratio.
Part 2: step time of each mixer at 4096 tokens, 1 device vs sequence=8, measured side by side. The 8 devices are
simulated on this host's cores: not a speedup measurement.
Part 3 (`--plans`, needs the aot extra; ~30 min): TransNormerLLM 1B and an xLSTM of ~1.3B at 128K and 1M tokens per
row, one row per step, `mesh.sequence=8` on `h100x8` and `v5p:2x2x2`: fits, peak per device, estimated step time.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxeff.parallel.hardware import aot_environment, get_target  # noqa: E402

# CPU devices for parts 1-2; compile-only GPU and TPU devices for part 3 (libtpu reads the TPU host's description
# when it starts, so it is set for the v5p slice before jax starts a backend)
aot_environment(get_target("v5p:2x2x2"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxeff.config import load_config  # noqa: E402
from jaxeff.errors import UserError  # noqa: E402
from jaxeff.parallel.sharding import batch_sharding  # noqa: E402
from jaxeff.train.comm_report import build_train_step  # noqa: E402
from jaxeff.train.optimizer import make_optimizer  # noqa: E402
from jaxeff.train.state import init_state  # noqa: E402

SMALL = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.mlp_dim=256",
         "model.compute_dtype=float32", "train.global_batch_size=1", "train.microbatches=1", "mesh.data=1",
         "mesh.fsdp=1"]
MIXERS = {
    "attention": ["model.mixer_pattern=[attention]"],
    "lightning": ["model.mixer_pattern=[lightning]", "model.lightning.lrpe_layers=[]"],
    "mlstm": ["model.mixer_pattern=[mlstm]", "model.n_kv_heads=null"],
    "companion": ["model.mixer_pattern=[companion]", "model.companion.state_dim=16", "model.companion.n_kernels=8"],
    "s2": ["model.mixer_pattern=[s2]", "model.s2.block_size=64", "model.s2.local_blocks=4", "model.s2.vert_stride=8"],
    "sink_window": ["model.mixer_pattern=[sink_window]", "model.s2.block_size=64", "model.s2.local_blocks=4",
                    "model.s2.sink_blocks=1"],
    "lightning + moe": ["model.mixer_pattern=[lightning]", "model.lightning.lrpe_layers=[]",
                        "model.channel_mixer_pattern=[moe]", "model.moe.n_experts=8", "model.moe.top_k=2",
                        "model.moe.capacity_factor=null"],
}
LENGTHS = [2**k for k in range(11, 21)]  # 2K .. 1M
ONE, SPLIT = {"mesh.sequence": 1}, {"mesh.sequence": 8}

TNL_1B = ("TransNormerLLM 1B", "configs/tnl-1b.yaml", [])
XLSTM_1B = ("xLSTM ~1.3B (d 2048, 24 layers)", "configs/xlstm-7b.yaml",
            ["model.d_model=2048", "model.n_layers=24", "model.n_heads=4", "model.mlp_dim=5504"])
PLAN_COMMON = ["train.global_batch_size=1", "train.microbatches=1", "mesh.data=1", "mesh.fsdp=1", "mesh.sequence=8",
               "model.remat=full"]
CHUNKED = ["model.loss_chunk=8192"]
# (model, tokens per row, target, extra overrides)
PLANS = [(model, n, target, CHUNKED) for model in (TNL_1B, XLSTM_1B) for n in (2**17, 2**20)
         for target in ("h100x8", "v5p:2x2x2")] + [(TNL_1B, 2**20, "h100x8", []),
                                                    (TNL_1B, 2**20, "v5p:2x2x4", CHUNKED + ["mesh.sequence=16"])]

def config(mixer: str, seq_len: int, mesh: dict):
    overrides = SMALL + MIXERS[mixer] + [f"data.seq_len={seq_len}"] + [f"{k}={v}" for k, v in mesh.items()]
    return load_config(REPO / "configs/debug.yaml", overrides)


def devices_for(mesh: dict) -> list:
    return jax.devices("cpu")[: mesh["mesh.sequence"]]


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def longest_fitting(mixer: str, mesh: dict, budget: int) -> tuple[int | None, dict[int, int]]:
    """The longest of LENGTHS whose step peak per device is within `budget`, and the peaks measured."""
    peaks, best = {}, None
    for seq_len in LENGTHS:
        try:
            step = build_train_step(config(mixer, seq_len, mesh), devices_for(mesh), with_data=False).compile()
        except UserError as e:  # e.g. a block longer than the sequence
            print(f"  {mixer} {seq_len}: {e}", flush=True)
            continue
        peaks[seq_len] = peak_bytes(step.compiled)
        print(f"  {mixer} sequence={mesh['mesh.sequence']} {seq_len}: {peaks[seq_len] / 2**20:.0f} MiB", flush=True)
        if peaks[seq_len] > budget:
            break
        best = seq_len
    return best, peaks


def step_seconds(mixer: str, mesh: dict, seq_len: int = 4096, steps: int = 3) -> float:
    cfg = config(mixer, seq_len, mesh)
    step = build_train_step(cfg, devices_for(mesh), with_data=False).compile()
    state = init_state(step.task.model, make_optimizer(cfg.train), step.shardings, 0, step.task.init_input)
    tokens = np.random.default_rng(0).integers(0, 256, (1, seq_len), np.int32)
    batch = jax.device_put({"inputs": tokens, "targets": np.roll(tokens, -1, 1)}, batch_sharding(step.mesh))
    state, metrics = step.compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step.compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def human(n: int | None) -> str:
    if n is None:
        return "< 2K"
    return f"{n // 2**20}M" if n >= 2**20 else f"{n // 2**10}K"


def memory_table(budget: int) -> tuple[str, dict]:
    rows, curves = [], {}
    for mixer in MIXERS:
        one, peaks_one = longest_fitting(mixer, ONE, budget)
        split, peaks_split = longest_fitting(mixer, SPLIT, budget)
        curves[mixer] = (peaks_one, peaks_split)
        ratio = f"{split / one:.0f}x" if one and split else "n/a"
        if split == LENGTHS[-1]:
            ratio = f">= {ratio}"
        common = max(set(peaks_one) & set(peaks_split))  # memory per device at one length, 1 vs 8 devices
        rows.append(f"| {mixer} | {human(one)} | {human(split)}{'+' if split == LENGTHS[-1] else ''} | {ratio} | "
                    f"{peaks_one[common] / peaks_split[common]:.1f}x at {human(common)} |")
    head = ["| token mixer | longest row, 1 device | longest row, sequence=8 | gain | peak per device, 1 device "
            "/ sequence=8 |", "|---|---|---|---|---|"]
    return "\n".join(head + rows), curves


def time_table() -> str:
    rows = ["| token mixer | step s, 1 device | step s, sequence=8 | ratio |", "|---|---|---|---|"]
    for mixer in MIXERS:
        one, split = step_seconds(mixer, ONE), step_seconds(mixer, SPLIT)
        rows.append(f"| {mixer} | {one:.3f} | {split:.3f} | {split / one:.2f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def plan_table() -> str:
    from jaxeff.train.plan import make_plan

    rows = ["| model | tokens per row | target | peak GiB per device (of HBM) | fits | est. step s (overlap) | "
            "collectives GiB sent per device | compile s |", "|---|---|---|---|---|---|---|---|"]
    for (name, path, extra), seq_len, target, more in PLANS:
        cfg = load_config(REPO / path, extra + PLAN_COMMON + more + [f"data.seq_len={seq_len}"])
        chunk = f"loss_chunk {cfg.model.loss_chunk}" if cfg.model.loss_chunk else "whole logits"
        try:
            plan = make_plan(cfg, target)
        except UserError as e:
            rows.append(f"| {name} | {human(seq_len)}, {chunk} | {target}, sequence {cfg.mesh.sequence} | - | error: {e} | - | - | - |")
            print(rows[-1], flush=True)
            continue
        sent = plan.collectives.get("total", {}).get("wire_bytes", 0) / 2**30
        rows.append(f"| {name} | {human(seq_len)}, {chunk} | {target}, sequence {cfg.mesh.sequence} | {plan.peak_bytes / 2**30:.1f} "
                    f"({plan.hbm_bytes / 2**30:.0f}) | {'yes' if plan.fits else 'NO'} | {plan.est_step_s:.2f} | "
                    f"{sent:.2f} | {plan.compile_s:.0f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def plot(curves: dict, budget: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (mixer, (one, split)) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(list(one), [b / 2**20 for b in one.values()], color=color, linestyle="--", marker="o", markersize=3)
        ax.plot(list(split), [b / 2**20 for b in split.values()], color=color, marker="o", markersize=3, label=mixer)
    ax.axhline(budget / 2**20, color="black", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="tokens per row", ylabel="peak MiB per device",
           title="train-step peak per device: 1 device (dashed) vs sequence=8 (solid)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    from common import write_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mib", type=int, default=512)
    parser.add_argument("--plans", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    budget = args.budget_mib * 2**20
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}"
    sections = []
    if not args.skip_memory:
        memory, curves = memory_table(budget)
        print(memory, flush=True)
        steps = time_table()
        print(steps, flush=True)
        if args.write:
            plot(curves, budget, REPO / "docs/img/sequence_parallel_memory.png")
        sections.append(
            f"Measured by `python benchmarks/sequence_parallel.py` on {machine} (8 simulated CPU devices). A small "
            f"model (d_model 128, 2 layers, 4 heads, float32, one row per step) compiled at doubling lengths; a "
            f"length fits when the train step's peak per device (arguments + outputs - donated + temporaries, "
            f"`compiled.memory_analysis()`) is within {args.budget_mib} MiB.\n\n{memory}\n\n"
            f"![peak per device against length](img/sequence_parallel_memory.png)\n\n"
            f"Step time at 4096 tokens, one row, measured side by side (the 8 simulated devices share this host's "
            f"cores: not a speedup measurement; below 1, smaller per-device working sets won, above 1 the split's extra work "
            f"cost more):\n\n{steps}")
    if args.plans:
        plans = plan_table()
        print(plans, flush=True)
        sections.append(f"`jaxeff plan` (compiled for the target, not run), one row per step, `model.remat=full`:"
                        f"\n\n{plans}")
    if args.write:
        for i, body in enumerate(sections):
            name = "sequence-parallel" if not args.skip_memory and i == 0 else "sequence-parallel-plans"
            title = ("Sequence parallelism: longest row per device budget" if name == "sequence-parallel"
                     else "Sequence parallelism: 128K and 1M tokens on 8 H100s / v5p chips (plan)")
            write_section(args.write, name, title, body)


if __name__ == "__main__":
    main()
