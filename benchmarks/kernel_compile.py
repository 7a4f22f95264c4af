"""Every Pallas op compiled for an H100 and a TPU v5e chip from this CPU host: compile times, and for the H100 the
resources of each Triton kernel (registers per thread, spills, shared memory, launch shape).

    python benchmarks/kernel_compile.py [--write docs/hardware.md] [--only lightning,mlstm,s2]

Forward + backward (`jax.value_and_grad` of a sum), bf16 q/k/v, impl="pallas", at the shapes our configs use
(SHAPES). Needs the aot extra (`pip install -e ".[aot]"`). Resources come from XLA's dump of the compiled program
(PTX per kernel, launch sequence) and `ptxas -v` (pallas_kernels.gpu_resources).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxeff.parallel.hardware import aot_environment  # noqa: E402

aot_environment()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from jaxeff.parallel.hardware import compile_only_devices, get_target  # noqa: E402
from pallas_kernels.gpu_resources import kernel_resources  # noqa: E402
from pallas_kernels.infllm import infllm_attention  # noqa: E402
from pallas_kernels.lightning_attention import lightning_attention  # noqa: E402
from pallas_kernels.mlstm import mlstm  # noqa: E402
from pallas_kernels.quant_matmul import quant_matmul  # noqa: E402
from pallas_kernels.s2_attention import s2_attention  # noqa: E402

# (op, label, batch, seq, heads, d_qk, d_v, kv heads): the shapes of configs/*.yaml scaled to accelerators
SHAPES = [
    ("lightning", "TNL 385M/1B heads (d 128, block 64)", 1, 8192, 8, 128, 128, None),
    ("lightning", "TNL LRPE layer (d_k 256 = 2 x 128, d_v 128)", 1, 8192, 8, 256, 128, None),
    ("mlstm", "128 x 128 heads (chunk 64)", 1, 8192, 8, 128, 128, None),
    ("mlstm", "xLSTM 7B heads (d_qk 256, d_v 512, chunk 64)", 1, 8192, 8, 256, 512, None),
    ("s2", "S2 GQA 32/8 heads of 128 (block 64, local 16, stride 8)", 1, 8192, 32, 128, 128, 8),
    ("infllm", "InfLLM v2 GQA 32/8 heads of 128 (block 64, kernels 32/16, local 16, top-k 16)", 1, 8192, 32, 128, 128,
     8),
]
# The serving matmul (forward only): (label, tokens, inputs, outputs, group size, activation bits); W6A8 and W8A8
# share the kernel (int8 codes either way), W6A6 differs in the activations' clip only.
QUANT_SHAPES = [("W6A8 / W8A8, 2048 tokens x 4096 -> 4096 (G 128)", 2048, 4096, 4096, 128, 8),
                ("W6A6, 2048 tokens x 4096 -> 11008 (G 128)", 2048, 4096, 11008, 128, 6)]
PREFIX = {"quant_matmul": "quant_matmul", "lightning": "lightning_attn", "mlstm": "mlstm_", "s2": "s2_", "infllm": "infllm_"}


def op_fn(op: str, heads: int):
    if op == "lightning":
        return lambda q, k, v: lightning_attention(q, k, v, jnp.linspace(0.05, 0.9, heads), impl="pallas",
                                                   block_size=64)
    if op == "mlstm":
        return lambda q, k, v, i, f: mlstm(q, k, v, i, f, impl="pallas", chunk_size=64)
    if op == "infllm":
        return lambda q, k, v: infllm_attention(q, k, v, block_size=64, local_blocks=16, topk=16, impl="pallas")
    return lambda q, k, v: s2_attention(q, k, v, block_size=64, local_blocks=16, vert_stride=8, impl="pallas")


def args_for(op, b, s, h, dk, dv, g, sharding):
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)  # noqa: E731
    if op in ("s2", "infllm"):
        return [bf16(b, s, h, dk), bf16(b, s, g, dk), bf16(b, s, g, dv)]
    args = [bf16(b, s, h, dk), bf16(b, s, h, dk), bf16(b, s, h, dv)]
    if op == "mlstm":
        args += [jax.ShapeDtypeStruct((b, s, h), jnp.float32, sharding=sharding)] * 2
    return args


def compile_once(op, shape, sharding, dump_dir=None) -> float:
    b, s, h, dk, dv, g = shape
    args = args_for(op, b, s, h, dk, dv, g, sharding)
    fn = op_fn(op, h)
    loss = lambda *xs: jnp.sum(fn(*xs).astype(jnp.float32))  # noqa: E731
    start = time.perf_counter()
    lowered = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))))).trace(*args).lower()
    lowered.compile(compiler_options={"xla_dump_to": str(dump_dir)} if dump_dir else None)
    return time.perf_counter() - start


def compile_quant_matmul(shape, sharding, dump_dir=None) -> float:
    n, i, o, g, bits = shape
    args = [jax.ShapeDtypeStruct((n, i), jnp.bfloat16, sharding=sharding),
            jax.ShapeDtypeStruct((i, o), jnp.int8, sharding=sharding),
            jax.ShapeDtypeStruct((i // g, o), jnp.float32, sharding=sharding)]
    fn = lambda x, w, s: quant_matmul(x, w, s, group_size=g, act_bits=bits, impl="pallas")  # noqa: E731
    start = time.perf_counter()
    jax.jit(fn).trace(*args).lower().compile(compiler_options={"xla_dump_to": str(dump_dir)} if dump_dir else None)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--only", default=None, help="comma-separated ops")
    args = parser.parse_args(argv)
    h100 = SingleDeviceSharding(compile_only_devices(get_target("h100x1"))[0])
    v5e = SingleDeviceSharding(compile_only_devices(get_target("v5e:2x2"))[0])
    times = ["| op | shape | H100 compile s | TPU v5e compile s |", "|---|---|---|---|"]
    resources = ["| kernel | shape | registers/thread | spill stores / loads (bytes) | shared memory (KiB) | threads "
                 "| grid |", "|---|---|---|---|---|---|---|"]
    for op, label, b, s, h, dk, dv, g in SHAPES:
        if args.only and op not in args.only.split(","):
            continue
        shape = (b, s, h, dk, dv, g)
        cells = {}
        with tempfile.TemporaryDirectory() as dump:
            for name, sharding, dump_dir in (("h100", h100, dump), ("v5e", v5e, None)):
                try:
                    cells[name] = f"{compile_once(op, shape, sharding, dump_dir):.1f}"
                except Exception as e:  # a kernel that does not compile is a result: show its first line
                    cells[name] = "FAILS: " + str(e).strip().splitlines()[0][:120]
            for r in kernel_resources(dump, (PREFIX[op],)):
                resources.append(f"| {r.name} | {label} | {r.registers} | {r.spill_stores} / {r.spill_loads} | "
                                 f"{r.shared_bytes / 1024:.0f} | {r.threads} | {'x'.join(map(str, r.grid))} |")
                print(resources[-1], flush=True)
        times.append(f"| {op} | {label} | {cells['h100']} | {cells['v5e']} |")
        print(times[-1], flush=True)
    for label, *shape in QUANT_SHAPES if not args.only or "quant_matmul" in args.only.split(",") else []:
        cells = {}
        with tempfile.TemporaryDirectory() as dump:
            for name, sharding, dump_dir in (("h100", h100, dump), ("v5e", v5e, None)):
                try:
                    cells[name] = f"{compile_quant_matmul(shape, sharding, dump_dir):.1f}"
                except Exception as e:
                    cells[name] = "FAILS: " + str(e).strip().splitlines()[0][:120]
            for r in kernel_resources(dump, (PREFIX["quant_matmul"],)):
                resources.append(f"| {r.name} | {label} | {r.registers} | {r.spill_stores} / {r.spill_loads} | "
                                 f"{r.shared_bytes / 1024:.0f} | {r.threads} | {'x'.join(map(str, r.grid))} |")
        times.append(f"| quant_matmul (forward only) | {label} | {cells['h100']} | {cells['v5e']} |")
        print(times[-1], flush=True)
    body = (f"`python benchmarks/kernel_compile.py` on this 2-core CPU host (jax {jax.__version__}), forward + "
            f"backward, bf16, batch 1, 8192 tokens, impl=\"pallas\".\n\n" + "\n".join(times) + "\n\nTriton kernels "
            "for the H100 (`ptxas -v` on XLA's PTX; shared memory and launch shape from XLA's thunk sequence; "
            "the H100 allows 227 KiB of shared memory per block and 255 registers per thread):\n\n"
            + "\n".join(resources))
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import write_section

        write_section(args.write, "kernel-compile", "Kernels compiled for H100 and TPU v5e", body)


if __name__ == "__main__":
    main()
