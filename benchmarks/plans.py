"""`jaxeff plan` for our large configs on an 8-GPU host and a TPU slice: the table in docs/hardware.md.

    python benchmarks/plans.py [--write docs/hardware.md] [--only NAME,...]

Each row compiles the config's train step for the target (minutes each on a 2-core host; xLSTM 7B's 32 unrolled
layers take the longest). Needs the aot extra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from jaxeff.parallel.hardware import aot_environment  # noqa: E402

aot_environment()

from jaxeff.config import load_config  # noqa: E402
from jaxeff.train.plan import make_plan  # noqa: E402

S2_1B = ["model.d_model=2048", "model.n_layers=24", "model.n_heads=16", "model.n_kv_heads=4", "model.mlp_dim=5632",
         "model.s2.block_size=64", "model.s2.local_blocks=16", "model.s2.vert_stride=8", "data.seq_len=8192",
         "train.global_batch_size=64", "mesh.data=1", "mesh.fsdp=-1", "model.remat=full", "train.microbatches=4"]
MOE_1B = ["model.d_model=2048", "model.n_layers=16", "model.n_heads=16", "model.n_kv_heads=4", "model.mlp_dim=5632",
          "model.moe.n_experts=64", "model.moe.top_k=8", "data.seq_len=4096", "train.global_batch_size=64",
          "mesh.data=1", "mesh.fsdp=1", "mesh.expert=-1", "model.remat=full", "train.microbatches=4"]

# name, config, target, overrides, what it is
PLANS = [
    ("xlstm7b-h100x8", "configs/xlstm-7b.yaml", "h100x8", [], "xLSTM 7B as shipped"),
    ("xlstm7b-v5p", "configs/xlstm-7b.yaml", "v5p:2x2x2", [], "xLSTM 7B as shipped"),
    ("tnl1b-h100x8", "configs/tnl-1b.yaml", "h100x8", [], "TransNormerLLM 1B as shipped"),
    ("tnl1b-v5p", "configs/tnl-1b.yaml", "v5p:2x2x2", [], "TransNormerLLM 1B as shipped"),
    ("s2-1b-h100x8", "configs/s2-debug.yaml", "h100x8", S2_1B, "S2 hybrid scaled to ~1B (d 2048, 24 layers, 8K)"),
    ("moe-1b-h100x8", "configs/moe-debug.yaml", "h100x8", MOE_1B,
     "MoE scaled (d 2048, 16 layers, 64 experts top-8, expert parallel 8)"),
]


def gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--only", default=None)
    args = parser.parse_args(argv)
    rows = ["| config | target | global batch x seq, microbatches, remat | params / optimizer / temporaries / peak GiB "
            "per device | fits | collectives sent per device per step | est. step (overlap / none) | est. MFU | "
            "compile s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, config, target, overrides, what in PLANS:
        if args.only and name not in args.only.split(","):
            continue
        plan = make_plan(load_config(REPO / config, overrides), target)
        wire = plan.collectives.get("total", {}).get("wire_bytes", 0)
        mfu = plan.est_mfu
        rows.append(
            f"| {what} | {target} | {plan.global_batch_size} x {plan.units_per_example}, {plan.microbatches}, "
            f"{plan.remat} | {gib(plan.param_bytes)} / {gib(plan.optimizer_bytes)} / {gib(plan.temp_bytes)} / "
            f"{gib(plan.peak_bytes)} of {gib(plan.hbm_bytes)} | {'yes' if plan.fits else 'NO'} | {gib(wire)} GiB "
            f"| {plan.est_step_s:.2f} s ({plan.bound}) / {plan.serial_step_s:.2f} s | "
            f"{'-' if mfu is None else f'{mfu:.0%}'} / {plan.mfu_at(plan.serial_step_s) or 0:.0%} | "
            f"{plan.compile_s:.0f} |")
        print(rows[-1], flush=True)
    body = "\n".join(rows)
    if args.write:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from common import write_section

        write_section(args.write, "plans", "Plans for our configs",
                      f"`python benchmarks/plans.py` (jaxeff plan for each row) on this 2-core CPU host.\n\n{body}")


if __name__ == "__main__":
    main()
