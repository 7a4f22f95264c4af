"""Ternary QAT vs float vs post-training ternary rounding on configs/debug.yaml (CPU).

    python benchmarks/qat.py [--float-steps 200] [--qat-steps 100] [--group-size 128] [--write docs/benchmarks.md]

1. float: configs/debug.yaml trained `--float-steps` steps.
2. float, continued: `train.init_from` the float run, `--qat-steps` more steps (same schedule as the QAT runs: a new
   run, warmup from 0, half the peak learning rate, as BitCPM4's QAT stage): the float model with the same tokens.
3. post-training ternary rounding (PTQ) of both float runs: absmean ternary matrices, no training.
4. QAT: `train.init_from` the float run with `train.qat.kind=ternary`, `--qat-steps` steps; per tensor and per group.

Every eval loss is on the same held-out batches (train.eval_batches=8), with the weights the model runs with; every
export is written by `jaxeff export` (`--ternary` for PTQ) and its size measured on disk. Also measured: loading the
float and the packed export (restore + unpack) and greedy decoding from both.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxeff.artifacts.load import load_trained  # noqa: E402
from jaxeff.config import load_config  # noqa: E402
from jaxeff.config.qat import QatConfig  # noqa: E402
from jaxeff.infer import export_checkpoint, load_inference_model  # noqa: E402
from jaxeff.models.decoding import generate_text  # noqa: E402
from jaxeff.models.qat import param_name, quantized_names  # noqa: E402
from jaxeff.tasks import build_task  # noqa: E402
from jaxeff.train import train  # noqa: E402

COMMON = ["sample.max_new_tokens=0", "logging.progress_bar=false", "train.eval_batches=8", "checkpoint.keep=1"]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def eval_loss(cfg, params) -> float:
    """The held-out loss of `params` on the batches the training runs evaluate on."""
    task = build_task(cfg)
    metrics = jax.jit(task.eval_metrics)
    batches = task.eval_batches(cfg.train.global_batch_size, cfg.train.eval_batches)
    return float(np.mean([float(metrics(params, b)["loss"]) for b in batches]))


def zero_fraction(params, qcfg: QatConfig) -> float:
    names = set(quantized_names(params, qcfg))
    values = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params) if param_name(p) in names]
    return sum(int((v == 0).sum()) for v in values) / sum(v.size for v in values)


def timed_generate(path: Path) -> tuple[float, float]:
    """(seconds to load, seconds per generated token after a warm-up) of greedy decoding."""
    t0 = time.perf_counter()
    m = load_inference_model(path)
    jax.block_until_ready(m.params)
    load_s = time.perf_counter() - t0
    generate_text(m.model, m.params, m.tokenizer, "def ", 8, 0.0, 0, 0)  # compile
    t0 = time.perf_counter()
    generate_text(m.model, m.params, m.tokenizer, "def ", 64, 0.0, 0, 0)
    return load_s, (time.perf_counter() - t0) / 64


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--float-steps", type=int, default=200)
    parser.add_argument("--qat-steps", type=int, default=100)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    config = REPO / "configs/debug.yaml"
    tmp = Path(tempfile.mkdtemp(prefix="jaxeff-qat-bench-"))
    cont = [f"train.steps={args.qat_steps}", "train.learning_rate=1.5e-3", f"train.warmup_steps={args.qat_steps // 10}",
            f"train.eval_every={args.qat_steps}"]
    rows, seconds, loop_eval = [], {}, {}

    def run(name: str, overrides: list[str]) -> Path:
        t0 = time.perf_counter()
        result = train(load_config(config, [*COMMON, *overrides]), tmp / name, console=False)
        seconds[name] = time.perf_counter() - t0
        loop_eval[name] = result.eval_losses[max(result.eval_losses)]
        print(f"{name}: eval loss {loop_eval[name]:.4f}, {seconds[name]:.0f}s", flush=True)
        return tmp / name

    float_dir = run("float", [f"train.steps={args.float_steps}", f"train.eval_every={args.float_steps}",
                             f"train.warmup_steps={min(50, args.float_steps // 6)}"])
    cont_dir = run("float_cont", [*cont, f"train.init_from={float_dir}"])
    qat_dirs = {0: run("qat", [*cont, f"train.init_from={float_dir}", "train.qat.kind=ternary"]),
                args.group_size: run(f"qat_g{args.group_size}", [*cont, f"train.init_from={float_dir}",
                                                                 "train.qat.kind=ternary",
                                                                 f"train.qat.group_size={args.group_size}"])}
    eval_cfg = load_config(config, COMMON)

    def row(label: str, steps: str, source: Path, quantize: QatConfig | None, wall: str):
        out, _ = export_checkpoint(source, tmp / "exports" / label.replace(" ", "_").replace(",", ""), quantize)
        loaded = load_trained(out)
        qcfg = loaded.qat
        loss = eval_loss(eval_cfg, loaded.run_params)
        zeros = f"{zero_fraction(loaded.run_params, qcfg):.0%}" if qcfg.enabled else "-"
        rows.append((label, steps, loss, du(Path(out) / "params"), zeros, wall))
        return Path(out)

    f_steps, q_steps = args.float_steps, args.qat_steps
    float_export = row("float", f"{f_steps}", float_dir, None, f"{seconds['float']:.0f}")
    row("float, continued", f"{f_steps} + {q_steps}", cont_dir, None, f"{seconds['float_cont']:.0f}")
    row("PTQ ternary of float", f"{f_steps}", float_dir, QatConfig(kind="ternary"), "-")
    row("PTQ ternary of float, continued", f"{f_steps} + {q_steps}", cont_dir, QatConfig(kind="ternary"), "-")
    row(f"PTQ ternary of float, continued, group {args.group_size}", f"{f_steps} + {q_steps}", cont_dir,
        QatConfig(kind="ternary", group_size=args.group_size), "-")
    packed_export = row("QAT ternary (init_from float)", f"{f_steps} + {q_steps}", qat_dirs[0], None,
                        f"{seconds['qat']:.0f}")
    row(f"QAT ternary, group {args.group_size}", f"{f_steps} + {q_steps}", qat_dirs[args.group_size], None,
        f"{seconds[f'qat_g{args.group_size}']:.0f}")

    # The QAT run's own last evaluation (in the loop, fake-quantized weights) against its packed export's.
    print(f"QAT: eval loss in the loop {loop_eval['qat']:.6f}, of the packed export {rows[5][2]:.6f}", flush=True)
    float_bytes = rows[0][3]
    table = ["| model | steps | eval loss | params/ on disk | vs float | zeros in ternary matrices | wall s |",
             "|---|---|---|---|---|---|---|"]
    for label, steps, loss, size, zeros, wall in rows:
        table.append(f"| {label} | {steps} | {loss:.4f} | {size / 1024:.0f} KiB | {float_bytes / size:.2f}x | "
                     f"{zeros} | {wall} |")

    quantized = load_trained(packed_export)
    names = set(quantized.qat.params)
    sizes = {param_name(p): x.size for p, x in jax.tree_util.tree_leaves_with_path(quantized.params)}
    q_elems, all_elems = sum(sizes[n] for n in names), sum(sizes.values())
    float_load, float_tok = timed_generate(float_export)
    packed_load, packed_tok = timed_generate(packed_export)
    notes = (f"The ternary matrices hold {q_elems:,} of the {all_elems:,} parameters ({q_elems / all_elems:.0%}; the "
             f"embedding, norms and the tied output head stay float32). Their codes take {q_elems / 4 / 1024:.0f} KiB "
             f"instead of {4 * q_elems / 1024:.0f} KiB (16x); the whole params/ directory, with the float embedding "
             f"and Orbax's metadata, is {float_bytes / rows[5][3]:.2f}x smaller. Loading the packed export (restore + "
             f"unpack to float32 matrices) took {packed_load:.2f}s against {float_load:.2f}s for the float one; "
             f"greedy decoding then runs the same float32 computation: {1e3 * packed_tok:.1f} vs "
             f"{1e3 * float_tok:.1f} ms per token (a difference of noise on a shared machine).")
    text = "\n".join(table) + "\n\n" + notes
    print(text)
    if args.write:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from common import write_section

        write_section(args.write, "qat", "Ternary QAT vs float vs post-training rounding (CPU)",
                      f"Measured by `python benchmarks/qat.py --float-steps {f_steps} --qat-steps {q_steps} "
                      f"--group-size {args.group_size}` on configs/debug.yaml (0.84M parameters, byte-level stdlib "
                      "text, one run each, seed 0). Continued runs start from the float run with `train.init_from` "
                      "(warmup from 0 to a peak learning rate of 1.5e-3). Eval loss: 8 held-out batches, with the "
                      "weights the model runs with (the packed export's for QAT and PTQ). See "
                      f"[methods/qat.md](methods/qat.md).\n\n{text}")


if __name__ == "__main__":
    main()
