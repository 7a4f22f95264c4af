"""Training telemetry: TensorBoard scalars (TensorFlow-free), a console progress bar, MFU estimate."""

from __future__ import annotations

import sys
import time

import jax

from jaxeff.parallel.hardware import chip_of_device_kind
from jaxeff.paths import Path


def peak_flops_per_device(override_tflops: float | None) -> float | None:
    """Override from config, else the chip table (jaxeff.parallel.hardware); None when unknown (CPU), and MFU is
    then not logged."""
    if override_tflops:
        return override_tflops * 1e12
    chip = chip_of_device_kind(jax.devices()[0].device_kind)
    return None if chip is None else chip.peak_bf16_flops


def device_memory_bytes() -> dict[str, float]:
    stats = jax.local_devices()[0].memory_stats() or {}
    return {f"memory/{k}": float(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


class TensorBoardWriter:
    """Scalars via tensorboardX (flax/clu writers need TensorFlow). Only process 0 writes."""

    def __init__(self, logdir: Path):
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(logdir), flush_secs=10)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


class Progress:
    """A live bar on a terminal; plain log lines when output is a file or a CI log."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.total, self.enabled = total_steps, enabled and jax.process_index() == 0
        self.live = self.enabled and sys.stdout.isatty()
        self._bar = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeRemainingColumn

            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TextColumn("ETA"), TimeRemainingColumn())
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, status="")
            self._bar.start()
        self._start_time, self._start_step = time.perf_counter(), start_step

    def update(self, step: int, loss: float, units_per_s: float, unit: str = "tok") -> None:
        if not self.enabled:
            return
        status = f"loss {loss:.4f}  " + (f"{units_per_s:,.0f} {unit}/s" if units_per_s else "(compiled)")
        if self.live:
            self._bar.update(self._task, completed=step, status=status)
        else:
            done = step - self._start_step
            eta = (time.perf_counter() - self._start_time) / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total}  {status}  ETA {eta:.0f}s", flush=True)

    def print(self, text: str) -> None:
        if jax.process_index() != 0:
            return
        if self.live:
            self._bar.console.print(text, markup=False, highlight=False)  # sample text is not markup
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
