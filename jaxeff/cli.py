"""The `jaxeff` command: train, export, quantize, generate, forecast, import, config-schema, comm-report, plan.

Exit codes, decided here and only here: 0 done; 2 a user error (`jaxeff.errors.UserError`: config,
data, paths, flags, workdir), printed as one line without a traceback; 1 training stopped (e.g.
non-finite losses); 130 Ctrl-C (before or after training at once, during training after a
checkpoint); 128 + signal when a scheduler's SIGTERM stopped training.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxeff", description="Train efficient sequence models with JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config (resumes if the workdir has checkpoints)")
    t.add_argument("--config", required=True, help="YAML config, e.g. configs/debug.yaml")
    t.add_argument("--workdir", default=None, help="output directory (default: runs/<config name>)")
    t.add_argument("--debug", action="store_true",
                   help="one device, jax_debug_nans, small batch/sequence; add train.jit=false to step eagerly")
    dist = t.add_argument_group("multi-process (usually set by a launcher; see docs/launch.md)")
    dist.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    dist.add_argument("--num-processes", type=int, default=None)
    dist.add_argument("--process-id", type=int, default=None)
    dist.add_argument("--failure-timeout", type=int, default=int(os.environ.get("JAXEFF_FAILURE_TIMEOUT", 100)),
                      metavar="SECONDS", help="stop all processes when one has been silent this long (default 100)")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.steps=50")

    e = sub.add_parser("export", help="write an inference checkpoint readable with plain orbax")
    e.add_argument("--workdir", required=True, help="a training workdir")
    e.add_argument("--out", required=True, help="new output directory")
    e.add_argument("--ternary", action="store_true",
                   help="post-training ternary rounding of a float run: its mixer matrices packed 2 bits per weight "
                        "(a train.qat run is exported packed without it); see docs/methods/qat.md")
    e.add_argument("--group-size", type=int, default=0, metavar="G",
                   help="with --ternary: one scale per G consecutive elements (default 0: one per matrix)")

    g = sub.add_parser("generate", help="sample text from a workdir or an export")
    g.add_argument("--workdir", required=True, help="a training workdir or an export directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="0 = no top-k filtering")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--draft", default=None, metavar="EXPORT",
                   help="speculative decoding: a smaller LM with the same tokenizer (workdir or export) proposes "
                        "tokens that this model checks; the output follows this model's distribution exactly "
                        "(docs/serving/speculative.md)")
    g.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="with --draft: tokens drafted per step")
    g.add_argument("--draft-vocab", type=float, default=None, metavar="FRACTION",
                   help="with --draft: FR-Spec, the draft proposes only the most frequent FRACTION of the vocabulary "
                        "of its training corpus (e.g. 0.25; EOS always included)")

    qz = sub.add_parser("quantize", help="post-training FlexQ quantization of a float export (W6A6, W6A8, W8A8, W4A16)",
                        description="Calibration-free: weights symmetric per group of G input elements, packed densely; "
                                    "activations quantized per token at run time. `jaxeff generate` runs the result. "
                                    "See docs/serving/quantize.md.")
    qz.add_argument("--from", dest="source", required=True, metavar="EXPORT", help="a float export (jaxeff export)")
    qz.add_argument("--out", required=True, help="new output directory")
    qz.add_argument("--scheme", required=True, metavar="SCHEME", help="w6a6, w6a8, w8a8 or w4a16")
    qz.add_argument("--group-size", type=int, default=128, metavar="G", help="input elements per scale (default 128)")
    qz.add_argument("--a8-layers", default=None, metavar="PATTERN[,PATTERN]",
                    help="kernels whose inputs get 8-bit activations under w6a6 (default layer_*/channel/down/kernel, "
                         "FlexQ's choice; '' for none)")

    fc = sub.add_parser("forecast", help="forecast with a trained forecasting run (task: forecast): print, plot")
    fc.add_argument("--workdir", required=True, help="a forecasting run's workdir or its export")
    fc.add_argument("--csv", default=None, metavar="FILE",
                    help="forecast this CSV (same columns as the training data) instead of the configured series")
    fc.add_argument("--plot", default=None, metavar="OUT.png", help="draw history, forecast and truth into OUT.png")
    fc.add_argument("--future", action="store_true",
                    help="forecast past the end of the data (default: the last horizon steps, compared with the truth)")

    im = sub.add_parser("import",
                        help="convert a Hugging Face checkpoint (xlstm, transnormer, openelm, qwen2, qwen2_parscale) "
                             "into a jaxeff export")
    im.add_argument("--from", dest="source", required=True, metavar="DIR",
                    help="model directory: config.json, model.safetensors (or shards + index), tokenizer.json")
    im.add_argument("--out", required=True, help="new output directory (the layout of `jaxeff export`)")
    im.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype written")

    cr = sub.add_parser(
        "comm-report", help="print the collectives of one train step (count, bytes per device) without training",
        description="Compile the train step of a config as `jaxeff train` would (no training, no workdir) and print "
                    "one JSON line per collective kind (count and bytes per device per step, read from the "
                    "optimised HLO), the total last. It uses all visible devices; simulate N CPU devices with "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=N.")
    cr.add_argument("--config", required=True, help="YAML config, e.g. configs/debug.yaml")
    cr.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. mesh.data=4")

    pl = sub.add_parser(
        "plan", help="compile the train step for a machine you do not have: memory, collectives, estimated step time",
        description="Compile the exact train step of `jaxeff train` (mesh, shardings, donation, microbatches, remat) "
                    "for a target machine with its real compiler, on abstract arrays (nothing allocated, no data "
                    "read), and print per device: parameter / optimizer / temporary bytes and the peak, whether it "
                    "fits, the collectives, FLOPs and a roofline step-time estimate with its MFU. Last line: one "
                    "JSON object. Needs the target's compiler plugin: pip install -e \".[aot]\". See "
                    "docs/hardware.md.")
    pl.add_argument("--config", required=True, help="YAML config, e.g. configs/xlstm-7b.yaml")
    pl.add_argument("--target", required=True, metavar="NAME",
                    help="h100x1, h100x8, h100x16, h100x32, or a TPU slice by jax's topology name (v5e:2x2, "
                         "v5p:2x2x1, v6e:4x4, ...)")
    pl.add_argument("--serve", default=None, metavar="SCHEME",
                    help="plan serving instead of training: the model as `jaxeff generate` runs it on one chip, in "
                         "bf16 and in SCHEME (w6a6, w6a8, w8a8, w4a16: `jaxeff quantize`) side by side; or bf16 alone")
    pl.add_argument("--batch", type=int, default=1, help="--serve: sequences decoded together (default 1)")
    pl.add_argument("--context", type=int, default=4096, help="--serve: tokens of prompt + output (default 4096)")
    pl.add_argument("--group-size", type=int, default=128, help="--serve: inputs per weight scale (default 128)")
    pl.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.microbatches=4")

    c = sub.add_parser("config-schema", help="print the JSON schema of config files (for editors' YAML language server)")
    c.add_argument("--out", default=None, metavar="FILE", help="write it to FILE instead of printing it")
    return p


def _import(args) -> int:
    from jaxeff.infer.hf_import import import_checkpoint

    out, arch, n_params = import_checkpoint(args.source, args.out, args.dtype)
    print(f"imported {arch} ({n_params / 1e6:,.1f}M parameters, {args.dtype}) to {out}; generate from it with "
          f"`jaxeff generate --workdir {out}` or fine-tune with train.init_from={out}")
    return 0


def _forecast(args) -> int:
    from jaxeff.infer.forecast import forecast_from_workdir, format_forecast, plot_forecast

    fc = forecast_from_workdir(args.workdir, args.csv, args.future)
    print(format_forecast(fc))
    if args.plot:
        print(f"plot: {plot_forecast(fc, args.plot)}")
    return 0


def _config_schema(args) -> int:
    from pathlib import Path

    from jaxeff.config import ConfigError
    from jaxeff.config.reference import schema_text

    if args.out is None:
        print(schema_text(), end="")
        return 0
    out = Path(args.out)
    try:
        out.write_text(schema_text())
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write the schema there ({e.strerror}); pass a writable file path") from None
    print(f"wrote {out}; point your editor at it with '# yaml-language-server: $schema={out}' (see docs/config.md)")
    return 0


def _train(args) -> int:
    from pathlib import Path

    from jaxeff.config import load_config
    from jaxeff.parallel import distributed
    from jaxeff.train import train

    cfg = load_config(args.config, args.overrides)
    # Before anything touches a JAX backend: jax.distributed must start first.
    distributed.initialize(distributed.detect(args.coordinator, args.num_processes, args.process_id),
                           args.failure_timeout)
    workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
    return train(cfg, workdir, debug=args.debug).exit_code


def _comm_report(args) -> int:
    import jax

    from jaxeff.config import load_config
    from jaxeff.train.comm_report import comm_report_lines

    cfg = load_config(args.config, args.overrides)
    for line in comm_report_lines(cfg, jax.devices()):
        print(line)
    return 0


def _plan(args) -> int:
    from jaxeff.parallel.hardware import aot_environment, get_target

    target = get_target(args.target)  # an unknown target fails before anything is loaded
    aot_environment(target)  # before jax starts a backend
    from pathlib import Path

    from jaxeff.config import load_config
    from jaxeff.train.plan import format_plan, make_plan

    cfg = load_config(args.config, args.overrides)
    if args.serve is not None:
        from jaxeff.infer.serve_plan import BASELINE, format_serve_plans, make_serve_plan

        schemes = [BASELINE] + ([args.serve] if args.serve != BASELINE else [])
        plans = [make_serve_plan(cfg, args.target, s, batch=args.batch, context=args.context,
                                 group_size=args.group_size) for s in schemes]
        lines = format_serve_plans(plans, Path(args.config).name)
    else:
        lines = format_plan(make_plan(cfg, args.target), Path(args.config).name)
    for line in lines:
        print(line, flush=True)
    return 0


def _export(args) -> int:
    from jaxeff.config import ConfigError
    from jaxeff.config.qat import QatConfig
    from jaxeff.infer import export_checkpoint

    if args.group_size < 0 or (args.group_size and not args.ternary):
        raise ConfigError(f"--group-size {args.group_size}: give a size >= 0 together with --ternary")
    quantize = QatConfig(kind="ternary", group_size=args.group_size) if args.ternary else None
    out, step = export_checkpoint(args.workdir, args.out, quantize)
    print(f"exported step {step} to {out} (params/ is a plain orbax checkpoint; config.json describes the model)")
    return 0


def _quantize(args) -> int:
    from jaxeff.infer.quantize import quantize_export

    a8 = None if args.a8_layers is None else [p for p in args.a8_layers.split(",") if p]
    out, record = quantize_export(args.source, args.out, args.scheme, args.group_size, a8)
    print(f"quantized {len(record['params'])} matrices of {args.source} to {record['scheme']} (groups of "
          f"{record['group_size']}) in {out}; run it with `jaxeff generate --workdir {out}`")
    return 0


def _generate(args) -> int:
    from jaxeff.config import ConfigError
    from jaxeff.infer.generate import load_inference_model
    from jaxeff.models.decoding import cache_report, generate_text

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if not args.temperature >= 0:  # also refuses nan
        raise ConfigError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if args.top_k < 0:
        raise ConfigError(f"--top-k {args.top_k}: must be >= 0 (0 = no top-k filter)")
    if args.draft is None and (args.draft_vocab is not None or args.draft_tokens != 4):
        raise ConfigError("--draft-tokens and --draft-vocab need --draft EXPORT (the draft model)")
    if args.draft_tokens < 1:
        raise ConfigError(f"--draft-tokens {args.draft_tokens}: must be at least 1")
    if args.draft_vocab is not None and not 0 < args.draft_vocab <= 1:
        raise ConfigError(f"--draft-vocab {args.draft_vocab}: must be in (0, 1] (a fraction of the vocabulary, "
                          "e.g. 0.25)")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates
        raise ConfigError("--prompt is not valid UTF-8 text; pass the prompt in UTF-8") from None
    loaded = load_inference_model(args.workdir)
    prompt_tokens = 1 + len(loaded.tokenizer.encode(args.prompt))  # BOS + the prompt, as generate_text
    report = cache_report(loaded.model_config, prompt_tokens + args.max_new_tokens)
    if report:
        print(f"jaxeff: {report}", file=sys.stderr, flush=True)
    if args.draft is None:
        text = generate_text(loaded.model, loaded.params, loaded.tokenizer, args.prompt, args.max_new_tokens,
                             args.temperature, args.top_k, args.seed)
        print(text)
        return 0
    from jaxeff.infer.generate import speculative_text

    text, stats = speculative_text(loaded, load_inference_model(args.draft), args.prompt, args.max_new_tokens,
                                   args.temperature, args.top_k, args.seed, args.draft_tokens, args.draft_vocab)
    print(text)
    print(f"jaxeff: {stats.line()} (compilation included)", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from jaxeff.interrupts import exit_at_once_on_ctrl_c

    exit_at_once_on_ctrl_c()  # first, so that Ctrl-C during imports and compilation is clean too
    args = _parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("JAXEFF_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax logs routine INFO/WARNING lines through absl
    # Imported late so that `jaxeff --help` is instant and argument errors come before JAX starts.
    from jaxeff.errors import EXIT_INTERRUPTED, EXIT_TRAINING_STOPPED, EXIT_USER_ERROR, UserError
    from jaxeff.interrupts import exit_now
    from jaxeff.train import TrainingStopped

    # exit_now: the explanation is the last line, and background threads (Orbax's asynchronous
    # saves, grain workers) cannot print over it while the interpreter shuts down.
    try:
        commands = {"train": _train, "export": _export, "generate": _generate, "import": _import, "forecast": _forecast,
                    "config-schema": _config_schema, "comm-report": _comm_report, "plan": _plan,
                    "quantize": _quantize}
        return commands[args.command](args)
    except UserError as e:
        exit_now(f"jaxeff: error: {e}", EXIT_USER_ERROR)
    except TrainingStopped as e:
        exit_now(f"jaxeff: training stopped: {e}", EXIT_TRAINING_STOPPED)
    except KeyboardInterrupt:
        exit_now("jaxeff: interrupted (Ctrl-C)", EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
