"""GPU check and timing of the FlexQ quantized matmul (W6A8 / W8A8) against a bfloat16 matmul (one call, ~30 s).

    python benchmarks/gpu/quant_matmul_gpu.py [--write docs/benchmarks.md]

1. Correctness on the GPU: the Pallas op against the dequantized float32 reference, a ragged input width.
2. Timing, serving shapes of a 7B's projections (tokens x 4096 -> 4096 and 4096 -> 11008, groups of 128):
   Pallas W8A8 and W6A8 (activations quantized per token inside the op) vs the XLA int32 form vs a plain
   bfloat16 matmul of the same shape, 10 timed calls each. Table last.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxeff  # noqa: E402,F401
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import bench, gpu_script_start, max_relative_error, normal, run, shapes, write_section  # noqa: E402
from pallas_kernels.quant_matmul import quant_matmul  # noqa: E402

G = 128
CASES = [(2048, 4096, 4096), (2048, 4096, 11008), (16, 4096, 11008)]  # (tokens, in, out): prefill and decode


def check_correctness() -> float:
    x = normal(jax.random.key(0), (40, 1000), jnp.float32)
    w = jax.random.randint(jax.random.key(1), (1000, 96), -31, 32).astype(jnp.int8)
    s = jnp.abs(normal(jax.random.key(2), (8, 96), jnp.float32)) * 0.01 + 1e-3
    ref = run(lambda x, w, s: quant_matmul(x, w, s, group_size=G, act_bits=8, impl="reference"), x, w, s)
    got = run(lambda x, w, s: quant_matmul(x, w, s, group_size=G, act_bits=8, impl="pallas"), x, w, s)
    return max_relative_error(ref, got)


def main(argv: list[str] | None = None) -> None:
    args, device, err = gpu_script_start(__doc__.splitlines()[0], argv, check_correctness)
    rows = ["| tokens x in -> out | bf16 matmul ms | W8A8 pallas ms | W6A8 pallas ms | W8A8 xla ms "
            "| bf16 / W8A8 pallas |",
            "|---|---|---|---|---|---|"]
    for n, i, o in shapes(CASES):
        x = normal(jax.random.key(3), (n, i), jnp.bfloat16)
        w_bf16 = normal(jax.random.key(4), (i, o), jnp.bfloat16)
        codes = jnp.zeros((i, o), jnp.int8)  # the values do not change the work
        scales = jnp.ones((i // G, o), jnp.float32)
        t_bf16 = bench(jax.jit(lambda x, w: x @ w), (x, w_bf16))
        times = {}
        for name, bits, impl in (("w8_pallas", 8, "pallas"), ("w6_pallas", 6, "pallas"), ("w8_xla", 8, "xla")):
            fn = jax.jit(lambda x, w, s, bits=bits, impl=impl: quant_matmul(x, w, s, group_size=G, act_bits=bits,
                                                                             impl=impl))
            times[name] = bench(fn, (x, codes, scales))
        rows.append(f"| {n} x {i} -> {o} | {t_bf16 * 1e3:.3f} | {times['w8_pallas'] * 1e3:.3f} | "
                    f"{times['w6_pallas'] * 1e3:.3f} | {times['w8_xla'] * 1e3:.3f} | "
                    f"{t_bf16 / times['w8_pallas']:.2f} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    if args.write:
        write_section(Path(__file__).resolve().parents[2] / args.write, "quant-matmul-gpu",
                      "FlexQ quantized matmul (Pallas) vs bfloat16 matmul on GPU",
                      f"`python benchmarks/gpu/quant_matmul_gpu.py` on {device.device_kind}, jax {jax.__version__}, "
                      f"groups of {G}. Pallas vs reference max relative error {err:.1e}.\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
