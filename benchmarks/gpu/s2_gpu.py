"""GPU check and timing of the S2-Attention Pallas kernels against dense flash attention (one call, ~1.5 min).

    python benchmarks/gpu/s2_gpu.py [--write docs/benchmarks.md]

1. Correctness on the GPU: the Pallas op (forward, LSE and gradients) against the dense masked reference, float32,
   a ragged length, GQA.
2. Timing, bfloat16, batch 1, 32 query / 8 KV heads of width 128, blocks of 64, Phi-3-small's pattern (window 16
   blocks, vertical stride 8), 8K-128K tokens: forward + backward of the Pallas S2 kernels vs dense causal
   attention (`jax.nn.dot_product_attention`, cuDNN flash attention where available, else XLA), 3 timed calls
   each (dense fwd+bwd at 128K is ~0.5 PFLOP). Table last.
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
from pallas_kernels.s2_attention import s2_attention  # noqa: E402

HQ, HKV, D, BLOCK, LOCAL, STRIDE = 32, 8, 128, 64, 16, 8
LENGTHS = [8192, 16384, 32768, 65536, 131072]


def check_correctness() -> float:
    return attention_pallas_error(s2_attention, block_size=64, local_blocks=2, vert_stride=4)


def main(argv: list[str] | None = None) -> None:
    args, device, err = gpu_script_start(__doc__.splitlines()[0], argv, check_correctness,
                                         "pallas vs reference (fwd + grads)")
    s2 = fwd_bwd(lambda q, k, v: s2_attention(q, k, v, block_size=BLOCK, local_blocks=LOCAL, vert_stride=STRIDE,
                                              impl="pallas"))
    rows = ["| length | S2 pallas fwd+bwd ms | dense fwd+bwd ms | dense / S2 |", "|---|---|---|---|"]
    for n in shapes(LENGTHS):
        q = normal(jax.random.key(1), (1, n, HQ, D), jnp.bfloat16)
        k, v = (normal(jax.random.key(i), (1, n, HKV, D), jnp.bfloat16) for i in (2, 3))
        t_s2 = bench(s2, (q, k, v), reps=3)
        try:
            t_dense = bench_softmax(fwd_bwd, q, k, v, reps=3)
        except Exception as e:  # out of memory at the longest lengths without flash attention
            print(f"dense at {n}: {type(e).__name__}", flush=True)
            t_dense = None
        rows.append(f"| {n} | {t_s2 * 1e3:.1f} | " + (f"{t_dense * 1e3:.1f} | {t_dense / t_s2:.2f} |" if t_dense
                                                      else "- | - |"))
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    if args.write:
        write_section(Path(__file__).resolve().parents[2] / args.write, "s2-gpu",
                      "S2-Attention Pallas kernels vs dense attention on GPU",
                      f"`python benchmarks/gpu/s2_gpu.py` on {device.device_kind}, jax {jax.__version__}, bfloat16, "
                      f"{HQ}/{HKV} heads x {D}, blocks {BLOCK}, window {LOCAL}, stride {STRIDE}. Pallas vs reference "
                      f"max relative error {err:.1e}.\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
