"""The GPU benchmark scripts cannot rot before a GPU is lent: `benchmarks/gpu/run_all.py --aot h100` compiles every
program the seven scripts would run for one H100 (the CUDA plugin's compile-only device; nothing runs, nothing is
written) and runs the scripts' own checks and table code on zeros. Each program is compiled at the first shape
only; a few minutes on a busy 2-core host, most of it in the Triton compiles of the Pallas kernels."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["companion_gpu", "infllm_gpu", "lightning_gpu", "mlstm_gpu", "moe_gpu", "quant_matmul_gpu", "s2_gpu"]


@pytest.mark.slow
def test_gpu_benchmarks_compile_for_an_h100():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu/run_all.py"), "--aot", "h100"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    tail = "\n".join(line for line in out.splitlines() if line.startswith("[run_all]") or "Error" in line)[-6000:]
    assert proc.returncode == 0, tail
    for name in SCRIPTS:
        assert f"[run_all] {name}: ok in " in out, tail
    assert "[run_all] 7/7 scripts ok" in out, tail
    assert "max relative error" in out and "| nan |" in out  # the scripts' checks and tables ran on zeros
