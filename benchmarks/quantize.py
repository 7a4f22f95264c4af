"""FlexQ post-training quantization of small LMs: held-out loss at each scheme vs float32 and bf16, export sizes.

    python benchmarks/quantize.py [--steps 300] [--models debug,xlstm-debug,tnl-debug,hf-xlstm]
                                  [--write docs/benchmarks.md]

Models: configs/debug.yaml (attention), configs/xlstm-debug.yaml (mLSTM), configs/tnl-debug.yaml (lightning
attention), and hf-xlstm: an xLSTM built and saved by transformers' own code (xLSTMForCausalLM, 4 blocks of d 128,
transformers' random init: no pretrained xLSTM or TNL checkpoint is reachable offline), imported with `jaxeff
import` (import_checkpoint) and fine-tuned from there (`train.init_from`). It checks the import path and xLSTM 7B's
layout (gates, soft caps) under quantization, not a pretrained model's robustness.

Each model is trained `--steps` steps on the same data and exported in float32; a bfloat16 export (the float weights
rounded to bfloat16 and stored so) is the serving baseline; `jaxeff quantize` (quantize_export) then writes one export
per scheme: W8A8, W6A8, W6A6 with FlexQ's 8-bit MLP down projection, W6A6 everywhere, W4A16. Every loss is on the
same 8 held-out batches the training run evaluates on, with the weights the export holds and, for the schemes with
quantized activations, every quantized projection's input fake-quantized per token in the forward (as `jaxeff
generate` runs it). Sizes are the bytes of each export's params/ directory on disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxeff.artifacts.export import write_config, write_params  # noqa: E402
from jaxeff.artifacts.load import load_trained  # noqa: E402
from jaxeff.artifacts.packed_flexq import activation_bits_of  # noqa: E402
from jaxeff.config import load_config  # noqa: E402
from jaxeff.data.tokenizer import ByteTokenizer  # noqa: E402
from jaxeff.infer import export_checkpoint  # noqa: E402
from jaxeff.infer.hf_import import import_checkpoint  # noqa: E402
from jaxeff.infer.quantize import quantize_export  # noqa: E402
from jaxeff.models.flexq_forward import coded_interceptor  # noqa: E402
from jaxeff.models.params import count_params  # noqa: E402
from jaxeff.tasks import build_task  # noqa: E402
from jaxeff.train import train  # noqa: E402

COMMON = ["sample.max_new_tokens=0", "logging.progress_bar=false", "train.eval_batches=8", "checkpoint.keep=1"]
ROWS = [("W8A8", "w8a8", None), ("W6A8", "w6a8", None), ("W6A6, down projection A8 (FlexQ)", "w6a6", None),
        ("W6A6 everywhere", "w6a6", []), ("W4A16 (weights only)", "w4a16", None)]
# name -> (config whose data and training settings it uses, what it is); hf-xlstm takes its model from the import
MODELS = {"debug": ("configs/debug.yaml", "attention"),
          "xlstm-debug": ("configs/xlstm-debug.yaml", "mLSTM"),
          "tnl-debug": ("configs/tnl-debug.yaml", "lightning attention"),
          "hf-xlstm": ("configs/xlstm-debug.yaml", "transformers' xLSTM, imported, fine-tuned")}
HEADER = ["| scheme | weight bits | activation bits | held-out loss | vs float32 | vs bf16 | params/ on disk (KiB) "
          "| vs float32 |", "|---|---|---|---|---|---|---|---|"]


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


def training_overrides(steps: int) -> list[str]:
    return [*COMMON, f"train.steps={steps}", f"train.eval_every={steps}", f"train.warmup_steps={min(50, steps // 6)}"]


def hf_xlstm_checkpoint(out: Path) -> Path:
    """A small xLSTM in transformers' own layout and init (torch seed 0), saved as a Hugging Face directory."""
    import torch
    from transformers import xLSTMConfig, xLSTMForCausalLM

    torch.manual_seed(0)
    # No tokenizer.json: the import falls back to the byte tokenizer, which needs this many embedding rows.
    config = xLSTMConfig(vocab_size=ByteTokenizer().vocab_size, hidden_size=128, num_hidden_layers=4, num_heads=2,
                         qk_dim_factor=0.5, v_dim_factor=1.0, mode="inference", chunk_size=16,
                         autocast_kernel_dtype="float32", weight_mode="single")
    xLSTMForCausalLM(config).float().save_pretrained(out)
    return out


def imported_config(import_dir: Path, base: str, overrides: list[str]):
    """`base`'s data and training settings with the import's model section (its shapes must match init_from's)."""
    model = json.loads((import_dir / "config.json").read_text())["model"]
    return load_config(REPO / base, [f"model={json.dumps(model)}", f"train.init_from={import_dir}", *overrides])


def float_export(cfg, tmp: Path) -> tuple[Path, str]:
    """Train `cfg`, export it in float32; returns the export and a line on the run."""
    t0 = time.perf_counter()
    result = train(cfg, tmp / "run", console=False)
    out, _ = export_checkpoint(tmp / "run", tmp / "float32")
    note = (f"{cfg.train.steps} steps, final eval loss {result.eval_losses[max(result.eval_losses)]:.4f}, "
            f"{time.perf_counter() - t0:.0f} s")
    return Path(out), note


def bf16_export(float_dir: Path, out: Path) -> Path:
    """The float export's weights rounded to bfloat16 and stored so, as `jaxeff import --dtype bfloat16` writes."""
    loaded = load_trained(float_dir)
    params = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)), jax.device_get(loaded.params))
    out.mkdir(parents=True)
    write_params(out, params)
    write_config(out, loaded.cfg, loaded.meta, step=loaded.step, param_count=count_params(params),
                 param_dtype="bfloat16")
    return out


def scheme_rows(cfg, float_dir: Path, tmp: Path, group_size: int) -> list[dict]:
    """One row per export: float32, bfloat16, then each FlexQ scheme."""
    rows = [dict(label="float32", w=32, a="32", dir=float_dir),
            dict(label="bfloat16 (weights)", w=16, a="32", dir=bf16_export(float_dir, tmp / "bf16"))]
    for label, scheme, a8 in ROWS:
        out = tmp / f"{scheme}-{'a6' if a8 == [] else 'flex'}"
        _, record = quantize_export(float_dir, out, scheme, group_size, a8)
        a_bits = sorted({e["activation_bits"] or 32 for e in record["params"].values()})
        rows.append(dict(label=label, w=record["weight_bits"], a="/".join(map(str, a_bits)), dir=out))
    for row in rows:
        row["loss"], row["bytes"] = eval_loss(cfg, row["dir"]), du(row["dir"] / "params")
        print(f"  {row['label']}: loss {row['loss']:.4f}, {row['bytes'] / 1024:.0f} KiB", flush=True)
    return rows


def table(rows: list[dict]) -> list[str]:
    """Markdown rows; deltas against float32 and bf16 (blank on the baseline itself), size ratio against float32."""
    f32, bf16 = rows[0], rows[1]

    def delta(row, base):
        return "" if row is base or row is f32 else f"{row['loss'] - base['loss']:+.4f}"

    def ratio(row):
        return "" if row is f32 else f"{row['bytes'] / f32['bytes']:.2f}x"

    return HEADER + [f"| {r['label']} | {r['w']} | {r['a']} | {r['loss']:.4f} | {delta(r, f32)} | {delta(r, bf16)} | "
                     f"{r['bytes'] / 1024:.0f} | {ratio(r)} |" for r in rows]


def run_model(name: str, steps: int, group_size: int, root: Path) -> str:
    """Train (or import and fine-tune), export, quantize and evaluate one model; its markdown."""
    config, what = MODELS[name]
    tmp = root / name
    overrides = training_overrides(steps)
    start = ""
    if name == "hf-xlstm":
        imported, _, _ = import_checkpoint(hf_xlstm_checkpoint(tmp / "hf"), tmp / "import")
        cfg = imported_config(Path(imported), config, overrides)
        start = f"imported at held-out loss {eval_loss(cfg, Path(imported)):.4f} (transformers' random init); "
    else:
        cfg = load_config(REPO / config, overrides)
    print(f"{name}: training", flush=True)
    float_dir, note = float_export(cfg, tmp)
    n_params = json.loads((float_dir / "config.json").read_text())["param_count"]
    print(f"{name}: {start}{note}", flush=True)
    rows = scheme_rows(cfg, float_dir, tmp, group_size)
    settings = f"training settings of {config}" if name == "hf-xlstm" else config
    title = f"**{name}** ({what}; {settings}; {n_params / 1e6:.2f}M parameters): "
    return title + start + note + "\n\n" + "\n".join(table(rows))


def describe(args, models: list[str]) -> str:
    command = f"python benchmarks/quantize.py --steps {args.steps} --models {','.join(models)}"
    return (f"`{command}` (jax {jax.__version__}, CPU, one seed): each model trained {args.steps} steps on the same "
            "byte-level data (batch 16 x 128 tokens, learning rate 3e-3), exported in float32, then `jaxeff "
            f"quantize` at each scheme with groups of {args.group_size} inputs. hf-xlstm is transformers' "
            "`xLSTMForCausalLM` (4 blocks of d 128, 2 heads, qk_dim_factor 0.5, soft caps 15 / 30) at transformers' "
            "random init, saved with `save_pretrained`, imported with `jaxeff import` and fine-tuned with "
            "`train.init_from`: no pretrained xLSTM or TNL checkpoint is reachable offline, so it checks the import "
            "path and xLSTM 7B's layout under quantization, not a pretrained model. The bfloat16 row is the float32 "
            "export's weights rounded to bfloat16 and stored so; the loader gives them back as float32 and every row "
            "runs the same float32 forward on CPU, so that row isolates the weight rounding (a GPU's bf16 serving "
            "would also round activations). Held-out loss on the 8 evaluation batches of the run, served as `jaxeff "
            "generate` runs it (activations fake-quantized per token and group in the forward). The embedding, head, "
            "norms and mLSTM's input/forget gates stay float32 and the scales add 4 bytes per 128 weights, so the "
            "size ratios sit above the matrices' own 8/32, 6/32 and 4/32; orbax compresses params/ (bfloat16 weights "
            "more than float32 ones), so the bfloat16 ratio is below 0.5.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models {args.models}: choose from {', '.join(MODELS)}")
    root = Path(tempfile.mkdtemp(prefix="jaxeff-quantize-bench-"))
    t0 = time.perf_counter()
    sections = [run_model(name, args.steps, args.group_size, root) for name in models]
    body = describe(args, models) + f" Wall time {time.perf_counter() - t0:.0f} s.\n\n" + "\n\n".join(sections)
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import write_section

        write_section(args.write, "quantize", "FlexQ post-training quantization (jaxeff quantize)", body)


if __name__ == "__main__":
    main()
