"""The accelerators jaxeff knows: one table of public figures, and compile-only devices for planning.

`CHIPS` is the one place in the code with hardware figures (the MFU line of training reads its peak FLOP/s
here too). `TARGETS` names the machines `jaxeff plan` compiles for; `compile_only_devices(target)` returns jax
devices of that machine without having one: libtpu describes TPU slices by jax's topology names, and the CUDA
plugin describes N GPUs from a `GpuTargetConfigProto` that we write from the chip's figures
(`gpu_target_config`). Both need `JAX_PLATFORMS=cpu` (no accelerator client starts) and the CUDA plugin
`JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` (it would call cuInit otherwise): `aot_environment()` sets them before jax
initialises its backends.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys

from jaxeff.errors import UserError

GiB = 2**30
HEADROOM = 0.90  # a plan fits when its peak is at most this fraction of the chip's HBM


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's public figures. Bandwidths are bytes/s in one direction per device."""

    name: str
    device_kind: str  # a substring of jax's `device.device_kind` for this chip
    peak_bf16_flops: float  # dense (no sparsity)
    hbm_bytes: int | None = None
    hbm_bandwidth: float | None = None
    link_bandwidth: float | None = None  # between devices of one host (NVLink) or of one slice (ICI)
    host_link_bandwidth: float | None = None  # between hosts (GPU: the InfiniBand NIC per GPU)
    source: str = ""


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("H100", "H100", 989e12, 84_942_979_072, 3.35e12, 450e9, 50e9,
         "NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s "
         "bidirectional; DGX H100: one 400 Gb/s InfiniBand NIC per GPU. HBM bytes as XLA's H100 SXM description"),
    Chip("H200", "H200", 989e12, 141 * 10**9, 4.8e12, 450e9, 50e9,
         "NVIDIA H200 SXM datasheet: 989 TFLOP/s dense bf16, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s"),
    Chip("TPU v5e", "TPU v5 lite", 197e12, 16 * GiB, 819e9, 200e9, None,
         "Cloud TPU v5e docs: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 400 GB/s bidirectional per chip"),
    Chip("TPU v5p", "TPU v5", 459e12, 95 * GiB, 2765e9, 600e9, None,
         "Cloud TPU v5p docs: 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, ICI 1200 GB/s bidirectional per chip"),
    Chip("TPU v6e", "TPU v6 lite", 918e12, 32 * GiB, 1638e9, 400e9, None,
         "Cloud TPU v6e docs: 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, ICI 800 GB/s bidirectional per chip"),
    # Peak FLOP/s only (the MFU of a training run on them), no plan targets:
    Chip("A100", "A100", 312e12), Chip("L40S", "L40S", 362e12), Chip("L4", "L4", 121e12), Chip("A10", "A10", 125e12),
    Chip("V100", "V100", 125e12), Chip("TPU v4", "TPU v4", 275e12),
)}


def chip_of_device_kind(device_kind: str) -> Chip | None:
    """The chip whose `device_kind` is the longest match (so "TPU v5 lite" is not read as "TPU v5")."""
    matches = [c for c in CHIPS.values() if c.device_kind.lower() in device_kind.lower()]
    return max(matches, key=lambda c: len(c.device_kind), default=None)


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine to plan for: `devices` chips over `hosts` hosts (TPU: as libtpu lays out the slice, known once its
    devices are made: `hosts_of(devices)`)."""

    name: str
    chip: Chip
    platform: str  # "cuda" | "tpu"
    devices: int
    hosts: int | None
    topology: str  # GPU: "hosts x 1 x per_host" for the CUDA plugin; TPU: jax's topology name

    @property
    def extra(self) -> str:
        return "cuda12" if self.platform == "cuda" else "tpu"


GPU_TARGETS = {"h100x1": (1, 1), "h100x8": (1, 8), "h100x16": (2, 8), "h100x32": (4, 8)}  # name -> (hosts, per host)
TPU_CHIPS = {"v5e": "TPU v5e", "v5p": "TPU v5p", "v6e": "TPU v6e"}
TPU_EXAMPLES = ("v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:16x16", "v5p:2x2x1", "v5p:2x2x2", "v5p:4x4x4", "v6e:2x2",
                "v6e:4x4")


def target_names() -> list[str]:
    return [*GPU_TARGETS, *TPU_EXAMPLES]


def get_target(name: str) -> Target:
    """A target by name: `h100x1`, `h100x8`, `h100x16`, `h100x32`, or a TPU slice by jax's topology name
    (`v5e:2x2`, `v5p:2x2x1`, `v6e:4x4`, ...; libtpu decides which shapes exist)."""
    if name in GPU_TARGETS:
        hosts, per_host = GPU_TARGETS[name]
        return Target(name, CHIPS["H100"], "cuda", hosts * per_host, hosts, f"{hosts} x 1 x {per_host}")
    m = re.fullmatch(r"(v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?", name)
    if m:
        version, dims = m.group(1), [int(d) for d in m.groups()[1:] if d]
        chips = 1
        for d in dims:
            chips *= d
        return Target(name, CHIPS[TPU_CHIPS[version]], "tpu", chips, None, name)
    raise UnknownTarget(f"unknown target {name!r}; known: {', '.join(target_names())} (any TPU slice by jax's "
                        "topology name, e.g. v5e:8x8, v5p:4x4x8)")


class UnknownTarget(UserError):
    pass


class MissingCompiler(UserError):
    """The plugin that compiles for a target is not installed."""


class CompileFailed(UserError):
    """The target's compiler rejected a program for another reason than its memory (e.g. a kernel's tile)."""


def hosts_of(devices: list) -> int:
    return len({d.process_index for d in devices})


def gpu_target_config(chip: Chip, compute_capability: tuple[int, int] = (9, 0)) -> str:
    """A `GpuTargetConfigProto` in text form for `chip` (the fields XLA's GPU compiler reads: SM count, shared
    memory, registers, clock, memory size and bandwidth). Figures: NVIDIA's H100 SXM5 specifications."""
    info = {
        "threads_per_block_limit": 1024, "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024, "shared_memory_per_core": 228 * 1024,
        "shared_memory_per_block_optin": 227 * 1024, "threads_per_core_limit": 2048, "core_count": 132,
        "fpus_per_core": 128, "block_dim_limit_x": 2**31 - 1, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
        "memory_bandwidth": int(chip.hbm_bandwidth), "l2_cache_size": 50 * 2**20, "clock_rate_ghz": 1.98,
        "device_memory_size": chip.hbm_bytes, "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
    }
    fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
    major, minor = compute_capability
    return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
            f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 8 patch: 0 }}\n'
            f'device_description_str: "NVIDIA {chip.name} 80GB HBM3"\n')


# libtpu loads with jax even when the target is a GPU, and warns at length when it cannot tell which TPU host it is
# on. Naming one host of the target's generation (any host: the slice comes from the topology name) quiets it.
_TPU_HOST_TYPE = {"v5e": "v5litepod-4", "v5p": "v5p-8", "v6e": "v6e-4"}


def aot_environment(target: Target | None = None) -> None:
    """Environment for compiling for devices this host lacks; must run before jax initialises its backends."""
    if target is not None:
        version = target.name.split(":")[0] if target.platform == "tpu" else "v5e"
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", _TPU_HOST_TYPE[version])
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu's lockfile guards real chips; we only compile
    if "jax" in sys.modules:  # jax read JAX_PLATFORMS when imported (jaxeff.parallel imports it); backends start later
        sys.modules["jax"].config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def require_compiler(target: Target) -> None:
    """MissingCompiler naming the pip command when the target's plugin is absent."""
    import jax

    module = "jax_plugins.xla_cuda12" if target.platform == "cuda" else "libtpu"
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise MissingCompiler(
            f"compiling for {target.name} needs the {target.platform} compiler plugin, which is not installed: "
            f'pip install "jax[{target.extra}]=={jax.__version__}" (or pip install -e ".[aot]", both plugins)')


def compile_only_devices(target: Target) -> list:
    """`target.devices` jax devices of the target, for `jit(...).trace(...).lower().compile()` only."""
    require_compiler(target)
    from jax.experimental import topologies

    if target.platform == "cuda":
        topology = topologies.get_topology_desc(platform="cuda", topology_name="", topology=target.topology,
                                                target_config=gpu_target_config(target.chip))
    else:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=target.topology)
    devices = list(topology.devices)
    if len(devices) != target.devices:
        raise UnknownTarget(f"target {target.name}: the {target.platform} plugin describes {len(devices)} devices, "
                            f"expected {target.devices}")
    return devices


def chip_table_markdown() -> str:
    """The plan targets' figures as docs/hardware.md shows them (a test keeps the two in step)."""
    rows = ["| chip | peak bf16 TFLOP/s | HBM GiB | HBM TB/s | link GB/s (one way) | between hosts GB/s | source |",
            "|---|---|---|---|---|---|---|"]
    for chip in CHIPS.values():
        if chip.hbm_bytes is None:
            continue
        host = f"{chip.host_link_bandwidth / 1e9:.0f}" if chip.host_link_bandwidth else "- (one slice: ICI)"
        rows.append(f"| {chip.name} | {chip.peak_bf16_flops / 1e12:.0f} | {chip.hbm_bytes / GiB:.1f} | "
                    f"{chip.hbm_bandwidth / 1e12:.2f} | {chip.link_bandwidth / 1e9:.0f} | {host} | {chip.source} |")
    return "\n".join(rows)
