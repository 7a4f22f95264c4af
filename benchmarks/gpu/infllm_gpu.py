"""GPU check and timing of the InfLLM v2 Pallas kernels against dense attention (one call, ~1 min).

    python benchmarks/gpu/infllm_gpu.py [--write docs/benchmarks.md]

1. Correctness on the GPU: the Pallas op (forward and gradients) against the dense masked reference, float32, a
   ragged length, GQA, the same run-time selection.
2. Timing, bfloat16, batch 1, 32 query / 8 KV heads of width 128, MiniCPM4's settings (blocks of 64, pooled keys
   32 wide at stride 16, 1 initial block, the query's block and the 32 before it, 62 more chosen: at most 96 blocks,
   6144 keys per query), 8K-64K tokens: forward + backward of the Pallas InfLLM kernels (selection included) vs
   dense causal attention (`jax.nn.dot_product_attention`, cuDNN flash attention where available), 3 timed calls
   each. Table last.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxeff  # noqa: E402,F401
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import (attention_pallas_error, bench, bench_softmax, fwd_bwd, gpu_script_start, normal,  # noqa: E402
                    shapes, write_section)
from pallas_kernels.infllm import infllm_attention  # noqa: E402

HQ, HKV, D = 32, 8, 128
SETTINGS = {"block_size": 64, "kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "local_blocks": 33,
            "topk": 63}  # MiniCPM4's sparse_config as its current code applies it (jaxeff's defaults)
LENGTHS = [8192, 16384, 32768, 65536]


def check_correctness() -> float:
    return attention_pallas_error(infllm_attention, block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1,
                                  local_blocks=2, topk=6)


def main(argv: list[str] | None = None) -> None:
    args, device, err = gpu_script_start(__doc__.splitlines()[0], argv, check_correctness,
                                         "pallas vs reference (fwd + grads)")
    sparse = fwd_bwd(lambda q, k, v: infllm_attention(q, k, v, impl="pallas", **SETTINGS))
    rows = ["| length | keys kept per query (at most) | InfLLM pallas fwd+bwd ms | dense fwd+bwd ms | dense / InfLLM |",
            "|---|---|---|---|---|"]
    for n in shapes(LENGTHS):
        q = normal(jax.random.key(1), (1, n, HQ, D), jnp.bfloat16)
        k, v = (normal(jax.random.key(i), (1, n, HKV, D), jnp.bfloat16) for i in (2, 3))
        t_sparse = bench(sparse, (q, k, v), reps=3)
        try:
            t_dense = bench_softmax(fwd_bwd, q, k, v, reps=3)
        except Exception as e:  # out of memory at the longest lengths without flash attention
            print(f"dense at {n}: {type(e).__name__}", flush=True)
            t_dense = None
        kept = min(n, SETTINGS["topk"] * SETTINGS["block_size"] + SETTINGS["local_blocks"] * SETTINGS["block_size"])
        rows.append(f"| {n} | {kept} | {t_sparse * 1e3:.1f} | "
                    + (f"{t_dense * 1e3:.1f} | {t_dense / t_sparse:.2f} |" if t_dense else "- | - |"))
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    if args.write:
        write_section(Path(__file__).resolve().parents[2] / args.write, "infllm-gpu",
                      "InfLLM v2 Pallas kernels vs dense attention on GPU",
                      f"`python benchmarks/gpu/infllm_gpu.py` on {device.device_kind}, jax {jax.__version__}, "
                      f"bfloat16, {HQ}/{HKV} heads x {D}, {SETTINGS}. Pallas vs reference max relative error "
                      f"{err:.1e}.\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
