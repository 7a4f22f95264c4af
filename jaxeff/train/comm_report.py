"""The train step's collectives (count, bytes per device) without training: `jaxeff comm-report`.

`compile_train_step` builds what the training loop builds for the step (task, optimizer, mesh, abstract
state and shardings) and compiles it with the loop's own helper, `aot_compile_train_step`, but creates no
state and touches no workdir or checkpoint. The counts come from the optimised HLO
(`jaxeff.parallel.collectives`). The loop reports the same figures at the start of training
(`comm_scalars` for TensorBoard, `comm_summary` for the header).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from jaxeff.parallel.collectives import collective_stats, format_report
from jaxeff.parallel.sharding import batch_sharding, replicated


def aot_compile_train_step(train_step: Callable, abstract: Any, shardings: Any, mesh,
                           batch_shapes: Mapping[str, jax.ShapeDtypeStruct]):
    """Compile `train_step(state, batch)` ahead of time for the state `abstract`/`shardings` and a batch of
    `batch_shapes` (the task's, for the global batch) split over the mesh's batch axes. The state argument
    is donated; the new state keeps `shardings`, the metrics are replicated. Used by the loop and the report."""
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh)) for k, v in batch_shapes.items()}
    with jax.set_mesh(mesh):
        return jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)),
                       out_shardings=(shardings, replicated(mesh)), donate_argnums=0).lower(abstract, batch).compile()


@dataclasses.dataclass
class TrainStep:
    """The train step of a config on given devices, everything built but not compiled."""

    step_fn: Callable
    mesh: Any
    task: Any
    abstract: Any  # the train state's ShapeDtypeStructs
    shardings: Any
    batch_shapes: Mapping[str, jax.ShapeDtypeStruct]
    compiled: Any = None  # jax.stages.Compiled, once `compile()` ran

    def compile(self) -> "TrainStep":
        self.compiled = aot_compile_train_step(self.step_fn, self.abstract, self.shardings, self.mesh,
                                               self.batch_shapes)
        return self


def compile_train_step(cfg, devices: list, **kwargs) -> TrainStep:
    """`build_train_step(...).compile()`."""
    return build_train_step(cfg, devices, **kwargs).compile()


def build_train_step(cfg, devices: list, *, with_data: bool = True) -> TrainStep:
    """The train step of `cfg` on `devices` as `jaxeff train` would compile it (also when train.jit is false: the
    report shows what a jitted step does), with its mesh, task and state shapes. `devices` may be compile-only
    devices of another platform spread over several hosts (`jaxeff plan`); `with_data=False` builds the task
    without reading its data. ConfigError for a config these devices cannot run."""
    from jaxeff.config import validate
    from jaxeff.models.qat import on_quantized_params, param_quantizer
    from jaxeff.parallel.mesh import build_mesh, process_row_shards
    from jaxeff.tasks import build_task
    from jaxeff.train.optimizer import learning_rate_schedule, make_optimizer
    from jaxeff.train.reparam import run_model
    from jaxeff.train.state import abstract_state_and_shardings
    from jaxeff.train.step import make_train_step

    validate(cfg, len(devices))
    task = build_task(cfg, devices[0].platform, with_data=with_data)
    task.model = run_model(task.model, cfg, task.init_input)  # train.sst / train.lora store other layouts
    tx = make_optimizer(cfg.train)
    mesh = build_mesh(cfg, devices)
    process_row_shards(mesh, cfg.train.global_batch_size)  # each host can load its share of every batch
    abstract, shardings = abstract_state_and_shardings(task.model, tx, mesh, cfg.train.seed, task.init_input)
    quantize = param_quantizer(cfg.train.qat, abstract["params"])  # train.qat: the fake quantization is in the step
    train_step = make_train_step(on_quantized_params(task.loss, quantize), tx, learning_rate_schedule(cfg.train),
                                 cfg.train.microbatches)
    return TrainStep(train_step, mesh, task, abstract, shardings, task.batch_shapes(cfg.train.global_batch_size))


def comm_report_lines(cfg, devices: list) -> list[str]:
    """One JSON line per collective kind in one train step, the "total" line last (`format_report`)."""
    return format_report(collective_stats(compile_train_step(cfg, devices).compiled))


def comm_scalars(stats: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """TensorBoard scalars `comm/<kind>/count` and `comm/<kind>/bytes_per_device`, the total included."""
    total = stats.get("total", {"count": 0, "bytes": 0})
    out: dict[str, float] = {}
    for kind, v in [*((k, v) for k, v in stats.items() if k != "total"), ("total", total)]:
        out[f"comm/{kind}/count"] = float(v["count"])
        out[f"comm/{kind}/bytes_per_device"] = float(v["bytes"])
    return out


def _mib(n: int) -> str:
    mib = n / 2**20
    return f"{mib:.2f} MiB" if mib >= 0.01 or n == 0 else f"{n / 1024:.1f} KiB"


def comm_summary(stats: Mapping[str, Mapping[str, int]]) -> str | None:
    """The header line, e.g. `collectives per step: all-reduce 12 x (1.50 MiB), ...` (MiB: that kind's bytes
    per device per step, all its collectives together); None when the step has no collectives."""
    kinds = [(k, v) for k, v in stats.items() if k != "total" and v["count"]]
    if not kinds:
        return None
    line = "collectives per step: " + ", ".join(f"{k} {v['count']} x ({_mib(v['bytes'])})" for k, v in kinds)
    total = stats.get("total", {})
    if len(kinds) > 1:
        line += f"; total {_mib(total.get('bytes', 0))} per device"
    else:
        line += " per device"
    unknown = total.get("unknown_trip_count", 0)
    if unknown:
        line += f" ({unknown} loop(s) of unknown trip count counted once)"
    return line
