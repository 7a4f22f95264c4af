"""What each Triton kernel of a GPU program uses on the chip, read from XLA's own compilation artefacts.

Compile with `lowered.compile(compiler_options={"xla_dump_to": DIR})` for a (compile-only) GPU: XLA then writes
the PTX of every kernel (`*.ptx`, one entry function each) and the launch sequence (`*.thunk_sequence.txt`:
kernel name, grid, threads per block, dynamic shared memory). `ptxas -v` (shipped in the nvidia-cuda-nvcc wheel
that `jax[cuda12]` installs) assembles the PTX as the driver would and prints registers per thread and spill
traffic. `kernel_resources(DIR, names)` joins the two for the kernels whose names start with one of `names`.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

_LAUNCH = re.compile(r"kCustomKernel\b.*?\]\s+(\S+)\s+grid:\s*\[([\d, ]+)\]\s+threads:\s*\[([\d, ]+)\]\s+"
                     r"shared_memory:\s*(\d+)\s*bytes")
_ENTRY = re.compile(r"\.entry\s+(\w+)\(")


@dataclasses.dataclass(frozen=True)
class KernelResources:
    name: str
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int
    stack_bytes: int
    shared_bytes: int  # dynamic shared memory per block at launch
    threads: int  # per block
    grid: tuple[int, ...]

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


def ptxas_path() -> Path:
    """The ptxas of the CUDA plugin's NVIDIA wheels (or on PATH)."""
    try:
        import nvidia.cuda_nvcc as nvcc  # the wheel jax[cuda12] installs

        for root in nvcc.__path__:
            candidate = Path(root) / "bin" / "ptxas"
            if candidate.is_file():
                return candidate
    except ImportError:
        pass
    found = shutil.which("ptxas")
    if found is None:
        raise FileNotFoundError("ptxas not found: pip install nvidia-cuda-nvcc-cu12 (jax[cuda12] brings it)")
    return Path(found)


def ptxas_report(ptx: Path, arch: str = "sm_90a") -> dict[str, int]:
    """registers / spill_stores / spill_loads / stack_bytes of the one entry function in `ptx`."""
    out = subprocess.run([str(ptxas_path()), "-v", "--gpu-name", arch, str(ptx), "-o", "/dev/null"],
                         capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, out)) else 0  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack_bytes": number(r"(\d+) bytes stack frame")}


def kernel_resources(dump_dir: str | Path, names: tuple[str, ...], arch: str = "sm_90a") -> list[KernelResources]:
    """One row per launched kernel whose name starts with one of `names` (our Pallas kernels' function names)."""
    dump_dir = Path(dump_dir)
    launches = {}
    for sequence in dump_dir.glob("*.thunk_sequence.txt"):
        for m in _LAUNCH.finditer(sequence.read_text()):
            name, grid, threads, shared = m.groups()
            launches[name] = (tuple(int(g) for g in grid.split(",")), int(threads.split(",")[0]), int(shared))
    rows = []
    for ptx in sorted(dump_dir.glob("*.ptx")):
        entry = _ENTRY.search(ptx.read_text())
        if entry is None or not entry.group(1).startswith(names) or entry.group(1) not in launches:
            continue
        grid, threads, shared = launches[entry.group(1)]
        rows.append(KernelResources(entry.group(1), **ptxas_report(ptx, arch), shared_bytes=shared, threads=threads,
                                    grid=grid))
    return sorted(rows, key=lambda r: r.name)
