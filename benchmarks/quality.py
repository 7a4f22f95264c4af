"""Quality run: the debug-size models side by side: softmax attention (configs/debug.yaml), TransNormerLLM
(configs/tnl-debug.yaml) and xLSTM (configs/xlstm-debug.yaml).

    python benchmarks/quality.py [--steps 600] [--eval-every 50] [--models debug tnl-debug xlstm-debug]
                                 [--write docs/benchmarks.md]

All train the same steps on the same data (the stdlib corpus, byte level) with the same optimizer;
eval losses on the held-out split are plotted to docs/img/quality_debug_models.png (needs matplotlib).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxeff.config import load_config  # noqa: E402
from jaxeff.train import train  # noqa: E402

MODELS = {"debug": "softmax attention (debug.yaml)", "tnl-debug": "TNL lightning (tnl-debug.yaml)",
          "xlstm-debug": "xLSTM mLSTM (xlstm-debug.yaml)"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    curves, seconds, params = {}, {}, {}
    for config_name in args.models:
        name, config = MODELS[config_name], f"configs/{config_name}.yaml"
        overrides = [f"train.steps={args.steps}", f"train.eval_every={args.eval_every}", "sample.max_new_tokens=0",
                     "logging.progress_bar=false", "train.eval_batches=8"]
        with tempfile.TemporaryDirectory() as workdir:
            t0 = time.perf_counter()
            result = train(load_config(REPO / config, overrides), workdir)
            seconds[name] = time.perf_counter() - t0
        curves[name] = result.eval_losses
        params[name] = sum(x.size for x in __import__("jax").tree.leaves(result.params))
        print(f"{name}: final eval loss {result.eval_losses[args.steps]:.4f}, {seconds[name]:.0f}s", flush=True)

    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import plot_eval_curves

    plot_eval_curves(curves, f"stdlib bytes, batch 16 x 128, {args.steps} steps", REPO / "docs/img/quality_debug_models.png")

    rows = ["| model | parameters | eval loss @ " + " | @ ".join(str(s) for s in (args.steps // 3, 2 * args.steps // 3,
                                                                                    args.steps)) + " | wall s |",
            "|---|---|---|---|---|---|"]
    for name, curve in curves.items():
        picks = [curve[min(curve, key=lambda s: abs(s - t))] for t in (args.steps // 3, 2 * args.steps // 3, args.steps)]
        rows.append(f"| {name} | {params[name] / 1e6:.2f}M | " + " | ".join(f"{v:.4f}" for v in picks)
                    + f" | {seconds[name]:.0f} |")
    table = "\n".join(rows)
    print(table)
    if args.write:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from common import write_section

        write_section(args.write, "quality", "Quality: softmax attention vs TransNormerLLM vs xLSTM (CPU)",
                      f"Measured by `python benchmarks/quality.py --steps {args.steps}`: the models train the "
                      "same steps on the same byte-level stdlib corpus with the same optimizer (one run each, seed 0)."
                      f"\n\n{table}\n\n![eval loss curves](img/quality_debug_models.png)")


if __name__ == "__main__":
    main()
