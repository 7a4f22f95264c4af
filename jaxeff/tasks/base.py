"""What the shared training loop needs from a task (`task:` in the config).

The loop owns the mesh, the train state, checkpoints, preemption, evaluation cadence and TensorBoard;
a task owns its data, its model, its loss and metrics, and what to show when training is done. One
module per task: lm.py (next-token prediction), forecast.py (time-series windows).
"""

from __future__ import annotations

import abc
from typing import Any, Iterable, Iterator

import jax


Batch = dict[str, Any]  # arrays with the batch first: int32[B, S] tokens, float32[B, L, C] windows, ...


class Task(abc.ABC):
    """Data, model, loss and metrics of one kind of training problem."""

    unit: str = "examples"  # what the throughput line counts per example ("tok", "windows")
    model: Any  # a Flax module: model.init(key, init_input) -> {"params": ...}

    @property
    @abc.abstractmethod
    def init_input(self) -> jax.ShapeDtypeStruct:
        """A batch-of-one model input for `model.init` (only its shape and dtype matter)."""

    @abc.abstractmethod
    def batch_shapes(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one global training batch (compiled ahead of time)."""

    @abc.abstractmethod
    def train_batches(self, per_process_batch: int, start_row: int = 0) -> Iterable[Batch]:
        """Endless, checkpointable (a grain dataset) batches of this process's rows of every global batch, starting
        at global row `start_row`: the order must not depend on the process count."""

    @abc.abstractmethod
    def eval_batches(self, per_process_batch: int, n_batches: int) -> Iterator[Batch]:
        """The same held-out batches at every evaluation."""

    @abc.abstractmethod
    def loss(self, params, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss to minimise, auxiliary metrics) under jit."""

    @abc.abstractmethod
    def eval_metrics(self, params, batch: Batch) -> dict[str, jax.Array]:
        """Held-out metrics of one batch under jit; "loss" is the one the loop prints."""

    @property
    def data_meta(self) -> dict[str, Any]:
        """JSON values recorded in every checkpoint; a restore compares them to decide whether the saved data
        position still applies."""
        return {}

    def units_per_example(self) -> int:
        return 1

    def flops_per_example(self) -> float | None:
        """Forward model FLOPs per example (None: not counted, no MFU)."""
        return None

    def describe(self) -> str:
        """Data summary for the header line."""
        return ""

    def finish(self, params_host, progress) -> str | None:
        """After training, on process 0 with the parameters on the host: a sample, a test table, ... Returns
        the text shown (kept in TrainResult.sample)."""
        return None


