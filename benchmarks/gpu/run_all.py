"""All GPU scripts in one call, one after another in one process: the run for the day a GPU is lent.

    python benchmarks/gpu/run_all.py [--write docs/benchmarks.md] [--only s2_gpu,moe_gpu]
    python benchmarks/gpu/run_all.py --aot h100     # dry run on any host: compile everything for an H100

Time budget: under 8 minutes on one H100 for all seven scripts (a lent machine gives at most 10 minutes per call;
benchmarks/README.md lists each script's share). Each script's `main(argv)` runs with `--write MARKDOWN` when
given; a line per script reports its wall time, a summary follows, and a failing script is reported and the rest
still run (exit status 1 if any failed).

`--aot h100` runs no GPU work: with a compile-only H100 from the CUDA plugin (jaxeff.parallel.hardware, the
target `jaxeff plan` uses), every program a script would run is compiled for the H100 instead (benchmarks/common.py,
AOT mode), once, at each script's first shape; the scripts go on with zeros, print "nan" for times and write no
docs. tests/test_gpu_benchmarks_aot.py runs it, so the scripts cannot rot before a GPU is lent.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))

SCRIPTS = ["companion_gpu", "infllm_gpu", "lightning_gpu", "mlstm_gpu", "moe_gpu", "quant_matmul_gpu", "s2_gpu"]
BUDGET_S = 8 * 60  # all scripts on one H100
AOT_TARGETS = {"h100": "h100x1"}  # --aot name -> jaxeff.parallel.hardware target (one device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", default=None, metavar="MARKDOWN", help="each script rewrites its section")
    parser.add_argument("--aot", choices=sorted(AOT_TARGETS), default=None,
                        help="compile-only dry run for this GPU: nothing runs, nothing is written")
    parser.add_argument("--all-shapes", action="store_true",
                        help="with --aot: compile at every shape of the real run (its compile time), not the first")
    parser.add_argument("--only", default=None, metavar="NAMES", help=f"comma-separated subset of {SCRIPTS}")
    args = parser.parse_args(argv)
    if args.aot and args.write:
        parser.error("--aot measures nothing: --write is not allowed with it")
    if args.all_shapes and not args.aot:
        parser.error("--all-shapes is for --aot (a real run always runs every shape)")
    names = SCRIPTS if args.only is None else [n.strip().removesuffix(".py") for n in args.only.split(",")]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        parser.error(f"unknown scripts {unknown}; known: {SCRIPTS}")

    import jaxeff  # noqa: F401  (XLA work-arounds, before any backend starts)
    import jax

    if args.aot:
        from jaxeff.parallel.hardware import aot_environment

        aot_environment()  # before jax starts a backend
        # jax read JAX_PLATFORMS when it was imported (jaxeff.parallel imports it): pass it on, no backend started yet
        jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    import common

    if args.aot:
        from jaxeff.parallel.hardware import compile_only_devices, get_target

        target = get_target(AOT_TARGETS[args.aot])
        # jax's GPU allocator takes XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of the memory: what a program gets
        pool = int(target.chip.hbm_bytes * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")))
        common.set_aot_device(compile_only_devices(target)[0], pool)
        common.AOT_ALL_SHAPES = args.all_shapes
        print(f"[run_all] AOT dry run: compiling for {common.target_device().device_kind} ({pool / 2**30:.1f} GiB for "
              "a program), nothing runs", flush=True)
    # one absolute path: some scripts resolve --write against the repository, others against the working directory
    script_argv = ["--write", str(Path(args.write).resolve())] if args.write else []

    results = []  # (name, ok, seconds, programs compiled, error line)
    start = time.perf_counter()
    for name in names:
        print(f"[run_all] {name}: start", flush=True)
        compiles_before = len(common.AOT_COMPILES)
        t0 = time.perf_counter()
        error = None
        try:
            importlib.import_module(name).main(list(script_argv))
        except (Exception, SystemExit) as e:  # noqa: BLE001  (report it, run the others)
            if not (isinstance(e, SystemExit) and not e.code):
                traceback.print_exc()
                error = common.first_line(e)
        seconds = time.perf_counter() - t0
        programs = common.AOT_COMPILES[compiles_before:]
        results.append((name, error is None, seconds, programs, error))
        extra = f", {len(programs)} programs compiled" if args.aot else ""
        print(f"[run_all] {name}: {'ok' if error is None else 'FAILED'} in {seconds:.1f} s{extra}"
              + (f": {error}" if error else ""), flush=True)
        for program, s in programs:  # AOT mode: each compile, in the order the script ran them
            print(f"[run_all]   compiled in {s:5.1f} s, {program[:150]}", flush=True)
        jax.clear_caches()  # the next script starts with its own memory
        gc.collect()

    total = time.perf_counter() - start
    failed = [r[0] for r in results if not r[1]]
    print("\n| script | status | wall s |" + (" programs compiled |" if args.aot else "")
          + "\n|---|---|---|" + ("---|" if args.aot else ""))
    for name, ok, seconds, programs, _ in results:
        print(f"| {name} | {'ok' if ok else 'FAILED'} | {seconds:.1f} |" + (f" {len(programs)} |" if args.aot else ""))
    mode = f"AOT dry run for {args.aot}" if args.aot else f"on {common.target_device().device_kind}"
    print(f"[run_all] {len(results) - len(failed)}/{len(results)} scripts ok, total {total:.1f} s ({mode}; "
          f"budget on one H100: {BUDGET_S} s)" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if not args.aot and total > BUDGET_S:
        print(f"[run_all] WARNING: over the {BUDGET_S} s budget: trim the scripts' shape lists or reps", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
