"""FlexQ post-training quantization of the debug LM: held-out loss at each scheme vs float, and export sizes.

    python benchmarks/quantize.py [--steps 300] [--write docs/benchmarks.md]

configs/debug.yaml is trained `--steps` steps and exported (float32); `jaxeff quantize` (quantize_export) then
writes one export per scheme: W8A8, W6A8, W6A6 with FlexQ's 8-bit MLP down projection, W6A6 everywhere, W4A16.
Every loss is on the same 8 held-out batches the training run evaluates on, with the weights the export holds and,
for the schemes with quantized activations, every quantized projection's input fake-quantized per token in the
forward (as `jaxeff generate` runs it). Sizes are the bytes of each export's params/ directory on disk.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxeff.artifacts.load import load_trained  # noqa: E402
from jaxeff.artifacts.packed_flexq import activation_bits_of  # noqa: E402
from jaxeff.config import load_config  # noqa: E402
from jaxeff.infer import export_checkpoint  # noqa: E402
from jaxeff.infer.quantize import quantize_export  # noqa: E402
from jaxeff.models.flexq_forward import coded_interceptor  # noqa: E402
from jaxeff.tasks import build_task  # noqa: E402
from jaxeff.train import train  # noqa: E402

COMMON = ["sample.max_new_tokens=0", "logging.progress_bar=false", "train.eval_batches=8", "checkpoint.keep=1"]
ROWS = [("W8A8", "w8a8", None), ("W6A8", "w6a8", None), ("W6A6, down projection A8 (FlexQ)", "w6a6", None),
        ("W6A6 everywhere", "w6a6", []), ("W4A16 (weights only)", "w4a16", None)]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def eval_loss(cfg, export: Path) -> float:
    """Held-out loss of an export as it is served: its weights, and its activation quantization if it has one."""
    loaded = load_trained(export)
    record = loaded.quantization or {}
    bits = activation_bits_of(record) if record.get("kind") == "flexq" else {}
    task = build_task(cfg)
    metrics = jax.jit(task.eval_metrics)  # traced afresh per export, under that export's interceptor
    batches = task.eval_batches(cfg.train.global_batch_size, cfg.train.eval_batches)
    with nn.intercept_methods(coded_interceptor(bits, record.get("group_size", 1))):
        return float(np.mean([float(metrics(loaded.run_params, b)["loss"]) for b in batches]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    config = REPO / "configs/debug.yaml"
    tmp = Path(tempfile.mkdtemp(prefix="jaxeff-quantize-bench-"))
    t0 = time.perf_counter()
    overrides = [*COMMON, f"train.steps={args.steps}", f"train.eval_every={args.steps}",
                 f"train.warmup_steps={min(50, args.steps // 6)}"]
    result = train(load_config(config, overrides), tmp / "run", console=False)
    print(f"float run: {args.steps} steps, eval loss {result.eval_losses[max(result.eval_losses)]:.4f}, "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    export_checkpoint(tmp / "run", tmp / "float")
    cfg = load_config(config, COMMON)
    float_loss, float_bytes = eval_loss(cfg, tmp / "float"), du(tmp / "float" / "params")
    lines = ["| scheme | weight bits | activation bits | held-out loss | vs float | params/ on disk (KiB) | vs float |",
             "|---|---|---|---|---|---|---|",
             f"| float32 | 32 | 32 | {float_loss:.4f} | | {float_bytes / 1024:.0f} | |"]
    print(lines[-1], flush=True)
    for label, scheme, a8 in ROWS:
        out = tmp / f"{scheme}-{'a6' if a8 == [] else 'flex'}"
        _, record = quantize_export(tmp / "float", out, scheme, args.group_size, a8)
        loss, size = eval_loss(cfg, out), du(out / "params")
        a_bits = sorted({e["activation_bits"] or 32 for e in record["params"].values()})
        lines.append(f"| {label} | {record['weight_bits']} | {'/'.join(map(str, a_bits))} | {loss:.4f} | "
                     f"{loss - float_loss:+.4f} | {size / 1024:.0f} | {size / float_bytes:.2f}x |")
        print(lines[-1], flush=True)
    body = (f"`python benchmarks/quantize.py` (jax {jax.__version__}, CPU): configs/debug.yaml trained {args.steps} "
            f"steps (0.84M parameters, byte-level, 4 layers of d 128), exported in float32, then `jaxeff quantize` "
            f"at each scheme with groups of {args.group_size} inputs. Held-out loss on the 8 evaluation batches of "
            "the run, served as `jaxeff generate` runs it (activations fake-quantized per token and group in the "
            "forward). The embedding, head and norms stay float32 (6% of this model's parameters) and the scales "
            "add 4 bytes per 128 weights, so the size ratios sit above the matrices' own 8/32, 6/32 and 4/32."
            "\n\n" + "\n".join(lines))
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import write_section

        write_section(args.write, "quantize", "FlexQ post-training quantization (jaxeff quantize)", body)


if __name__ == "__main__":
    main()
