"""GPU check and timing of the lightning attention kernels (one call, ~1.5 min on one H100).

    python benchmarks/gpu/lightning_gpu.py [--write docs/benchmarks.md]

1. Correctness on the GPU: the Pallas op (forward and gradients) against the float32 jnp reference
   on random inputs with a ragged length.
2. Timing at 64K tokens per step in bfloat16 (batch x seq = 65536, 8 heads... see SHAPES):
   forward+backward of the Pallas kernel, the chunked jnp path, and softmax attention
   (`jax.nn.dot_product_attention`, cuDNN flash attention where available, else XLA).
Prints a short table last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pallas_kernels.lightning_attention import lightning_attention  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (PALLAS_TABLE_HEADER, bench, bench_softmax_or_none, fwd_bwd, max_relative_error,  # noqa: E402
                    normal, pallas_table_row, run, shapes, target_device)

HEADS, DIM = 8, 128
# (batch, seq): 64K tokens per step each. Each shape compiles the Pallas forward+backward anew (~30 s for an H100
# on our 2-core host, run_all.py --aot h100 --all-shapes): 64 x 1024 was dropped to keep run_all.py under 8 min.
SHAPES = [(16, 4096), (4, 16384), (1, 65536)]


def check_correctness() -> float:
    keys = jax.random.split(jax.random.key(0), 5)
    q, k = (normal(kk, (2, 300, 4, 64), jnp.float32) * 0.3 for kk in keys[:2])
    v = normal(keys[2], (2, 300, 4, 32), jnp.float32)
    s0 = normal(keys[3], (2, 4, 64, 32), jnp.float32)
    rate = jnp.asarray([1e-3, 0.05, 0.5, 2.0], jnp.float32)
    ct = normal(keys[4], (2, 300, 4, 32), jnp.float32)

    def loss(impl):
        return lambda q, k, v, s0: jnp.sum(lightning_attention(q, k, v, rate, initial_state=s0, impl=impl) * ct)

    ref = run(jax.value_and_grad(loss("reference"), argnums=(0, 1, 2, 3)), q, k, v, s0)
    pal = run(jax.value_and_grad(loss("pallas"), argnums=(0, 1, 2, 3)), q, k, v, s0)
    return max_relative_error(ref, pal)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    device = target_device()
    print(f"device: {device.device_kind}, jax {jax.__version__}", flush=True)
    err = check_correctness()
    print(f"pallas vs reference, float32, forward + grads, seq 300: max relative error {err:.2e}", flush=True)

    rows = list(PALLAS_TABLE_HEADER)
    rate = jnp.asarray(2.0 ** -np.arange(1, HEADS + 1), jnp.float32)
    for batch, seq in shapes(SHAPES):
        keys = jax.random.split(jax.random.key(seq), 3)
        q, k, v = (normal(kk, (batch, seq, HEADS, DIM), jnp.bfloat16) * 0.1 for kk in keys)
        times = {impl: bench(fwd_bwd(lambda q, k, v, impl=impl: lightning_attention(q, k, v, rate, impl=impl)),
                             (q, k, v)) for impl in ("pallas", "chunked")}
        times["softmax"] = bench_softmax_or_none(fwd_bwd, q, k, v, f"{batch} x {seq}")
        rows.append(pallas_table_row(f"{batch} x {seq}", times))
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(f"\n{device.device_kind}: {HEADS} heads, d {DIM}, bfloat16, 64K tokens per step\n{table}")
    if args.write:
        from common import write_section

        write_section(args.write, "lightning-gpu", "Lightning attention on GPU",
                      f"Measured by `python benchmarks/gpu/lightning_gpu.py` on {device.device_kind} "
                      f"(jax {jax.__version__}). Pallas vs reference max relative error (float32, fwd+grads): "
                      f"{err:.2e}.\n\n{table}")


if __name__ == "__main__":
    main()
