"""What the training loop and inference need from a task (`task:` in the config).

A task has two halves:

- **The model contract** (class methods): the model is built from the config plus a small JSON `meta` that the
  task derives from its data (LM: tokenizer and vocabulary; forecasting: channels and normaliser). No data is
  read, so inference, export, import and fine-tuning build the model from a checkpoint's or export's meta alone.
  The meta is written into every checkpoint and every export.
- **Training** (an instance, built from the config): loads the data, computes `meta`, and supplies batches, the
  loss and held-out metrics under jit, throughput units, FLOPs and an end-of-run output.

The loop owns the mesh, the train state, checkpoints, preemption, evaluation cadence and TensorBoard. One module
per task: lm.py (next-token prediction), forecast.py (time-series windows).
"""

from __future__ import annotations

import abc
from jaxeff.paths import Path
from typing import Any, ClassVar, Iterable, Iterator

import flax.linen as nn
import jax

from jaxeff.config import Config

Batch = dict[str, Any]  # arrays with the batch first: int32[B, S] tokens, float32[B, L, C] windows, ...
Meta = dict[str, Any]  # JSON values: what the model's shape depends on besides the config


class Task(abc.ABC):
    """Data, model, loss and metrics of one kind of training problem."""

    name: ClassVar[str]  # the `task:` value
    command: ClassVar[str]  # the CLI command that runs this task's trained models ("generate", "forecast")
    # Config sections an export keeps besides `model` (what the model contract and inference read).
    export_sections: ClassVar[tuple[str, ...]] = ()
    unit: ClassVar[str] = "examples"  # what the throughput line counts per example ("tok", "windows")

    # ------------------------------------------------------------------ the model contract: config + meta, no data

    @classmethod
    @abc.abstractmethod
    def build_model(cls, cfg: Config, meta: Meta, platform: str | None = None) -> nn.Module:
        """The Flax module: `model.init(key, model_input) -> {"params": ...}`."""

    @classmethod
    def build_inference_model(cls, cfg: Config, meta: Meta, platform: str | None = None) -> nn.Module:
        """The module a trained model is served with (`jaxeff generate` / `forecast`): the training one, unless the
        task runs its layers otherwise for inference. Same parameters."""
        return cls.build_model(cfg, meta, platform)

    @classmethod
    @abc.abstractmethod
    def model_input(cls, cfg: Config, meta: Meta) -> jax.ShapeDtypeStruct:
        """A batch-of-one model input for `model.init` (only its shape and dtype matter)."""

    @classmethod
    def legacy_meta(cls, cfg: Config, checkpoint_meta: dict[str, Any]) -> Meta:
        """The meta of a checkpoint written before tasks recorded one (from its config and checkpoint meta)."""
        raise NotImplementedError(f"task {cls.name} has no checkpoints from before task meta")

    @classmethod
    def export_meta(cls, meta: Meta, source_dir: Path | None, out: Path) -> Meta:
        """The meta as an export in `out` records it, after copying any file it names there (a tokenizer)."""
        return meta

    @classmethod
    def inactive_params(cls, cfg: Config) -> int:
        """Parameters a token or example does not use (MoE experts it is not routed to); 0 for dense models."""
        return 0

    # ------------------------------------------------------------------ training

    model: nn.Module
    meta: Meta

    def __init__(self, cfg: Config, platform: str | None = None, *, with_data: bool = True):
        self.cfg = cfg
        self.meta = self.load_data() if with_data else self.meta_without_data()
        self.model = self.build_model(cfg, self.meta, platform)

    @abc.abstractmethod
    def load_data(self) -> Meta:
        """Read the training data (kept on `self`); return the meta it implies."""

    def meta_without_data(self) -> Meta:
        """The meta from the config alone, for compiling the train step without its data (`jaxeff plan`): the
        batch shapes, loss and model must then work. By default the data is loaded; a task whose data may live
        only on the training cluster (LM text) derives it from its config instead."""
        return self.load_data()

    @property
    def init_input(self) -> jax.ShapeDtypeStruct:
        return self.model_input(self.cfg, self.meta)

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
