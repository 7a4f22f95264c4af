"""Per-step bookkeeping of the loop: metrics read one step late, throughput, TensorBoard, progress."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax

from jaxeff.train.metrics import Progress, TensorBoardWriter, device_memory_bytes


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. non-finite losses); the message says why and what to change."""


@dataclasses.dataclass
class Throughput:
    units_per_step: int  # tokens (language models), windows (forecasting), ...
    flops_per_step: float | None  # model FLOPs of one training step (forward + backward); None: not counted
    n_devices: int
    peak_flops_per_device: float | None  # None: MFU unknown (CPU without an override)
    unit: str = "tok"

    @property
    def scalar_name(self) -> str:
        return "tokens_per_s" if self.unit == "tok" else f"{self.unit}_per_s"


class StepTelemetry:
    """The loop hands over each step's metrics right after dispatching it; they are read (which waits
    for the device) only when the *next* step has been dispatched, so the host prepares batch n+1
    while the device runs step n."""

    def __init__(self, writer: TensorBoardWriter, progress: Progress, throughput: Throughput, *, start_step: int,
                 total_steps: int, log_every: int, max_consecutive_nonfinite: int):
        self.writer, self.progress, self.throughput = writer, progress, throughput
        self.start_step, self.total_steps, self.log_every = start_step, total_steps, log_every
        self.max_nonfinite = max_consecutive_nonfinite
        self.losses: dict[int, float] = {}
        self._pending: tuple[int, Any] | None = None
        self.restart_interval()

    def restart_interval(self) -> None:
        """Start a new timing interval (after compilation, evaluation, ...)."""
        self._interval_start, self._interval_steps = time.perf_counter(), 0

    def dispatched(self, step: int, metrics: Any) -> None:
        self._interval_steps += 1
        self._read_pending(newer_in_flight=True)
        self._pending = (step, metrics)

    def flush(self) -> None:
        """Read the step in flight, if any. Raises TrainingStopped on too many non-finite steps in a row."""
        self._read_pending(newer_in_flight=False)

    def _read_pending(self, newer_in_flight: bool) -> None:
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        metrics = jax.device_get(metrics)
        self.losses[step] = float(metrics["loss"])
        streak = int(metrics["nonfinite_streak"])
        if streak >= self.max_nonfinite:
            raise TrainingStopped(
                f"{streak} steps in a row had non-finite gradients (step {step}); those updates were skipped and "
                "parameters are the last finite ones. Lower train.learning_rate, set train.grad_clip, or check "
                "the data; rerun with --debug to find the first NaN.")
        first = step == self.start_step + 1
        if first or step % self.log_every == 0 or step == self.total_steps:
            self._log(step, metrics, first, newer_in_flight)

    def _log(self, step: int, metrics: dict, first: bool, newer_in_flight: bool) -> None:
        elapsed = time.perf_counter() - self._interval_start
        scalars = {"loss": self.losses[step], "learning_rate": float(metrics["learning_rate"]),
                   "grad_norm": float(metrics["grad_norm"]), "nonfinite_skipped_total": float(metrics["nonfinite_total"]),
                   **{k: float(v) for k, v in metrics.items() if k.startswith(("loss/", "aux/"))},
                   **device_memory_bytes()}
        units_per_s = 0.0
        if first:  # includes tracing and compilation: reported on its own, kept out of throughput
            scalars["first_step_with_compile_s"] = elapsed
        else:
            t = self.throughput
            finished = self._interval_steps - (1 if newer_in_flight else 0)
            step_time = elapsed / max(finished, 1)
            units_per_s = t.units_per_step / step_time
            scalars.update({t.scalar_name: units_per_s, "step_time_s": step_time})
            if t.flops_per_step is not None:
                scalars["model_tflops_per_s_per_device"] = t.flops_per_step / step_time / t.n_devices / 1e12
            if t.peak_flops_per_device and t.flops_per_step is not None:
                scalars["mfu"] = t.flops_per_step / step_time / (t.peak_flops_per_device * t.n_devices)
        self.writer.scalars(step, scalars)
        self.progress.update(step, self.losses[step], units_per_s, self.throughput.unit)
        self.restart_interval()
        if newer_in_flight:  # the step dispatched just before this read belongs to the new interval
            self._interval_steps = 1
