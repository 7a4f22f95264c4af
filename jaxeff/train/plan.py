"""`jaxeff plan`: the train step `jaxeff train` would run, compiled for a machine this host does not have.

The step is the loop's own (`compile_train_step`: same mesh, shardings, donation, microbatches, remat), compiled
by the target's real compiler for compile-only devices (`jaxeff.parallel.hardware`) on abstract arrays: nothing is
allocated and no data is read. From the compiled program:

- **Memory per device**: parameters and optimizer state from their shardings; arguments, outputs, donated
  (aliased) bytes and temporaries from XLA's memory analysis. Peak = arguments + outputs - aliased + temporaries.
  It fits when the peak is at most `HEADROOM` of the chip's HBM (the rest: the runtime, collective buffers,
  library workspaces, fragmentation).
- **Collectives per step** from the optimised HLO (the comm-report counter), and the bytes each device sends for
  them with ring algorithms (`wire_bytes`).
- **A roofline estimate**: compute time (the larger of the model's FLOPs, plus one more forward pass under
  `model.remat: full`, and XLA's counted FLOPs per device, at the chip's peak), memory time (XLA's bytes accessed per device where the compiler reports them, else every
  state byte read and written once and every temporary written and read once, at the HBM bandwidth) and
  collective time (wire bytes at the link bandwidth: NVLink / ICI within a host or slice, the per-GPU network
  link as soon as the mesh spans GPU hosts). The step time is the largest of the three (perfect overlap), which
  names the bound; MFU = model FLOPs / (devices x peak x that time). Their sum (no overlap at all) gives the
  pessimistic end. An estimate from public peak figures, not a measurement: real steps are slower still (kernel
  efficiency below peak, launch overheads), so a compute-bound plan's MFU is an upper bound.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any

import jax

from jaxeff.parallel.collectives import collective_stats
from jaxeff.parallel.hardware import HEADROOM, CompileFailed, Target, compile_only_devices, get_target, hosts_of
from jaxeff.parallel.report import tree_bytes_per_device
from jaxeff.parallel.sharding import batch_sharding
from jaxeff.train.comm_report import build_train_step, comm_summary
from jaxeff.train.zo import passes_per_step


@dataclasses.dataclass
class Plan:
    target: Target
    devices: int
    hosts: int
    mesh: dict[str, int]
    global_batch_size: int
    units_per_example: int
    unit: str
    microbatches: int
    remat: str
    param_bytes: int  # per device, as every figure below unless named otherwise
    optimizer_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    collectives: dict[str, dict[str, int]]
    model_flops_per_step: float | None  # all devices together
    xla_flops_per_device: float | None  # None: the compiler reports no cost analysis ahead of time
    xla_bytes_per_device: float | None
    compile_s: float
    refused: str | None = None  # the compiler's own out-of-memory refusal (TPU), when it gave one

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def hbm_bytes(self) -> int:
        return self.target.chip.hbm_bytes

    @property
    def fits(self) -> bool:
        return self.refused is None and self.peak_bytes <= HEADROOM * self.hbm_bytes

    @property
    def link_bandwidth(self) -> float:
        chip = self.target.chip
        return chip.host_link_bandwidth if self.hosts > 1 and chip.host_link_bandwidth else chip.link_bandwidth

    def times(self) -> dict[str, float]:
        """Seconds per step of each roofline term."""
        chip = self.target.chip
        recompute = 4 / 3 if self.remat == "full" else 1.0  # full remat runs the forward twice: 4 passes, not 3
        flops = max((self.model_flops_per_step or 0.0) * recompute / self.devices, self.xla_flops_per_device or 0.0)
        if self.xla_bytes_per_device:
            memory_bytes = self.xla_bytes_per_device
        else:
            memory_bytes = 2 * (self.param_bytes + self.optimizer_bytes) + 2 * self.temp_bytes
        wire = self.collectives.get("total", {}).get("wire_bytes", 0)
        return {"compute": flops / chip.peak_bf16_flops, "memory": memory_bytes / chip.hbm_bandwidth,
                "collectives": wire / self.link_bandwidth if wire else 0.0}

    @property
    def est_step_s(self) -> float:
        return max(self.times().values())

    @property
    def serial_step_s(self) -> float:
        """No overlap at all between compute, memory traffic and collectives."""
        return sum(self.times().values())

    @property
    def bound(self) -> str:
        times = self.times()
        return max(times, key=times.get)

    @property
    def est_mfu(self) -> float | None:
        return self.mfu_at(self.est_step_s)

    def mfu_at(self, step_s: float) -> float | None:
        if not self.model_flops_per_step or not step_s:
            return None
        return self.model_flops_per_step / (self.devices * self.target.chip.peak_bf16_flops * step_s)

    def summary(self) -> dict[str, Any]:
        """The last line of `jaxeff plan`."""
        mfu = self.est_mfu
        return {"target": self.target.name, "devices": self.devices, "fits": self.fits,
                "peak_bytes_per_device": self.peak_bytes, "param_bytes": self.param_bytes,
                "optimizer_bytes": self.optimizer_bytes, "temp_bytes": self.temp_bytes,
                "flops_per_step": self.model_flops_per_step, "est_step_s": round(self.est_step_s, 6),
                "est_mfu": None if mfu is None else round(mfu, 4), "compile_s": round(self.compile_s, 2)}


def make_plan(cfg, target_name: str) -> Plan:
    """Compile `cfg`'s train step for `target_name` and measure it (UnknownTarget / MissingCompiler / ConfigError
    for what cannot be planned)."""
    target = get_target(target_name)
    devices = compile_only_devices(target)
    hosts = hosts_of(devices)
    step = build_train_step(cfg, devices, with_data=False)
    start, refused = time.perf_counter(), None
    try:
        step.compile()
    except jax.errors.JaxRuntimeError as e:
        refused = _out_of_memory(e)
        if refused is None:
            first = str(e).strip().splitlines()[0]
            raise CompileFailed(f"the train step does not compile for {target.name}: {first}") from None
    compile_s = time.perf_counter() - start
    task, tcfg = step.task, cfg.train
    params = tree_bytes_per_device(step.abstract["params"], step.shardings["params"])
    optimizer = tree_bytes_per_device(step.abstract["opt_state"], step.shardings["opt_state"])
    if refused is None:
        memory = step.compiled.memory_analysis()
        sizes = dict(argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
                     alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes)
        collectives, cost = collective_stats(step.compiled), _cost_analysis(step.compiled)
    else:  # what the compiler said the temporaries need, around the state it would have held
        state = tree_bytes_per_device(step.abstract, step.shardings)
        sizes = dict(argument_bytes=state + _batch_bytes_per_device(step), output_bytes=state, alias_bytes=state,
                     temp_bytes=refused[1])
        collectives, cost = {}, {}
    per_example = task.flops_per_example()
    return Plan(
        target=target, devices=len(devices), hosts=hosts, mesh=dict(step.mesh.shape),
        global_batch_size=tcfg.global_batch_size, units_per_example=task.units_per_example(), unit=task.unit,
        microbatches=tcfg.microbatches, param_bytes=params,
        remat="none" if tcfg.optimizer == "zo" else getattr(cfg.model, "remat", "none"),  # zo: no backward to remat
        optimizer_bytes=optimizer, **sizes, collectives=collectives,
        model_flops_per_step=(None if per_example is None  # zo: n + 1 forward passes
                              else passes_per_step(tcfg) * per_example * tcfg.global_batch_size),
        xla_flops_per_device=cost.get("flops"), xla_bytes_per_device=cost.get("bytes accessed"),
        compile_s=compile_s, refused=None if refused is None else refused[0])


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _out_of_memory(error: Exception) -> tuple[str, int] | None:
    """(the compiler's sentence, the temporaries it needs in bytes) when it refused the program for lack of HBM
    (the TPU compiler checks this itself), else None."""
    text = str(error)
    m = re.search(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)\)", text)
    if "RESOURCE_EXHAUSTED" not in text or not m or "HBM" not in text:
        return None
    sentence = text[text.index("Ran out of memory") if "Ran out of memory" in text else 0:].splitlines()[0]
    return sentence.strip(), int(float(m.group(1)) * _UNITS[m.group(2)])


def _batch_bytes_per_device(step) -> int:
    shapes = list(step.batch_shapes.values())
    return tree_bytes_per_device(shapes, [batch_sharding(step.mesh)] * len(shapes))


def _cost_analysis(compiled) -> dict[str, float]:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends raise instead of returning None
        return {}
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else None
    return {k: float(v) for k, v in (cost or {}).items() if k in ("flops", "bytes accessed") and v > 0}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def format_plan(plan: Plan, config_name: str) -> list[str]:
    t, chip = plan.target, plan.target.chip
    times = plan.times()
    mesh = ", ".join(f"{k} {v}" for k, v in plan.mesh.items() if v > 1) or "1 device"
    lines = [
        f"plan: {config_name} on {t.name} ({plan.devices} x {chip.name}, {plan.hosts} host(s)); mesh {mesh}; "
        f"global batch {plan.global_batch_size} x {plan.units_per_example} {plan.unit}, "
        f"{plan.microbatches} microbatch(es), remat {plan.remat}",
        f"memory per device: params {_gib(plan.param_bytes)}, optimizer state {_gib(plan.optimizer_bytes)}, "
        f"step arguments {_gib(plan.argument_bytes)} (donated {_gib(plan.alias_bytes)}), outputs "
        f"{_gib(plan.output_bytes)}, temporaries {_gib(plan.temp_bytes)}",
        f"peak {_gib(plan.peak_bytes)} of {_gib(plan.hbm_bytes)} HBM "
        f"({plan.peak_bytes / plan.hbm_bytes:.0%}): {'fits' if plan.fits else 'does NOT fit'} "
        f"(rule: peak <= {HEADROOM:.0%} of HBM)" + (f"; the compiler refused it: {plan.refused}" if plan.refused else ""),
        comm_summary(plan.collectives) or "collectives per step: none",
    ]
    wire = plan.collectives.get("total", {}).get("wire_bytes", 0)
    flops = plan.model_flops_per_step
    if plan.xla_flops_per_device:
        xla = f"XLA counts {plan.xla_flops_per_device:.3g} per device (Pallas kernels not included)"
    else:
        xla = "XLA's cost analysis: " + ("none (the program was refused)" if plan.refused else
                                         "not reported by this compiler ahead of time")
    lines.append(f"FLOPs per step: model {flops:.3g} ({flops / plan.devices:.3g} per device); {xla}"
                 if flops else f"FLOPs per step: the task does not count them; {xla}")
    lines.append(
        f"estimate: compute {_seconds(times['compute'])} at {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s, memory "
        f"{_seconds(times['memory'])} at {chip.hbm_bandwidth / 1e12:.2f} TB/s, collectives "
        f"{_seconds(times['collectives'])} ({_gib(wire)} sent per device at {plan.link_bandwidth / 1e9:.0f} GB/s) "
        f"-> step {_seconds(plan.est_step_s)}, {plan.bound}-bound"
        + (f", MFU {plan.est_mfu:.0%}" if plan.est_mfu is not None else "")
        + f"; without overlap {_seconds(plan.serial_step_s)}"
        + (f", MFU {plan.mfu_at(plan.serial_step_s):.0%}" if plan.est_mfu is not None else ""))
    lines.append(f"compiled for {t.name} in {plan.compile_s:.1f} s")
    lines.append(json.dumps(plan.summary()))
    return lines
