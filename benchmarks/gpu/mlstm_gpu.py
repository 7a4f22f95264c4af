"""GPU check and timing of the mLSTM kernels (one call, ~2 min on one H100).

    python benchmarks/gpu/mlstm_gpu.py [--write docs/benchmarks.md]

1. Correctness on the GPU: the Pallas op (forward and gradients incl. the forget gate) against the float32
   quadratic reference on random inputs with a ragged length and an initial state.
2. Timing at 64K tokens per step in bfloat16 (xLSTM 7B's head shape: 8 heads, d_qk 256, d_v 512, chunk 64):
   forward+backward of the Pallas kernels, the chunked jnp path, and softmax attention with d 256
   (`jax.nn.dot_product_attention`, cuDNN flash attention where available, else XLA; cuDNN takes head dims up to
   128, and XLA's attention holds the whole score matrix: 194 GiB at 1 x 65536 by run_all.py --aot h100
   --all-shapes, more than an H100 has, so that cell reads "-"). Prints a short table last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (PALLAS_TABLE_HEADER, bench, bench_softmax_or_none, fwd_bwd, max_relative_error,  # noqa: E402
                    normal, pallas_table_row, run, shapes, target_device)
from pallas_kernels.mlstm import mlstm  # noqa: E402

HEADS, D_QK, D_V = 8, 256, 512
# (batch, seq): 64K tokens per step each. Each shape compiles the Pallas and chunked forward+backward anew (~40 s
# for an H100 on our 2-core host, run_all.py --aot h100 --all-shapes): 4 x 16384 was dropped to keep run_all.py
# under 8 min.
SHAPES = [(16, 4096), (1, 65536)]


def check_correctness() -> float:
    keys = jax.random.split(jax.random.key(0), 8)
    q, k = (normal(kk, (2, 300, 4, 64), jnp.float32) for kk in keys[:2])
    v = normal(keys[2], (2, 300, 4, 32), jnp.float32)
    i = normal(keys[3], (2, 300, 4)) - 5.0
    f = normal(keys[4], (2, 300, 4)) + 3.0
    c0, n0 = normal(keys[5], (2, 4, 64, 32)) * 0.3, normal(keys[6], (2, 4, 64)) * 0.3
    m0 = jnp.zeros((2, 4))
    ct = normal(keys[7], (2, 300, 4, 32), jnp.float32)

    def loss(impl):
        return lambda q, k, v, i, f, c0, n0: jnp.sum(
            mlstm(q, k, v, i, f, initial_state=(c0, n0, m0), impl=impl, chunk_size=64) * ct)

    args = (q, k, v, i, f, c0, n0)
    ref = run(jax.value_and_grad(loss("reference"), argnums=tuple(range(7))), *args)
    pal = run(jax.value_and_grad(loss("pallas"), argnums=tuple(range(7))), *args)
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
    for batch, seq in shapes(SHAPES):
        keys = jax.random.split(jax.random.key(seq), 5)
        q, k = (normal(kk, (batch, seq, HEADS, D_QK), jnp.bfloat16) for kk in keys[:2])
        v = normal(keys[2], (batch, seq, HEADS, D_V), jnp.bfloat16)
        i = normal(keys[3], (batch, seq, HEADS)) - 5.0
        f = normal(keys[4], (batch, seq, HEADS)) + 3.0
        times = {impl: bench(fwd_bwd(lambda q, k, v, impl=impl: mlstm(q, k, v, i, f, impl=impl)), (q, k, v))
                 for impl in ("pallas", "chunked")}
        times["softmax"] = bench_softmax_or_none(fwd_bwd, q, k, v[..., :D_QK], f"{batch} x {seq}")
        rows.append(pallas_table_row(f"{batch} x {seq}", times))
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(f"\n{device.device_kind}: {HEADS} heads, d_qk {D_QK}, d_v {D_V}, bfloat16, 64K tokens per step\n{table}")
    if args.write:
        from common import write_section

        write_section(args.write, "mlstm-gpu", "mLSTM on GPU",
                      f"Measured by `python benchmarks/gpu/mlstm_gpu.py` on {device.device_kind} "
                      f"(jax {jax.__version__}). Pallas vs reference max relative error (float32, fwd+grads): "
                      f"{err:.2e}.\n\n{table}")


if __name__ == "__main__":
    main()
