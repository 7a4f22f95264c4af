"""One loader for every task: a training workdir or an export -> (config, task, model, params, meta, step).

The model is built by the task's model contract from the config and the recorded meta; no training data is read.
Workdirs written before checkpoints recorded the meta get it from the task's `legacy_meta`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import orbax.checkpoint as ocp

from jaxeff.artifacts.checkpoint import CheckpointStore, restore_newest
from jaxeff.artifacts.export import is_export, read_config, read_quantization
from jaxeff.artifacts.packed import packed_abstract, qat_of_record, unpack_params
from jaxeff.artifacts.packed_flexq import KIND as FLEXQ, activation_bits_of, unpack_flexq
from jaxeff.config import Config, ConfigError, read_saved_config
from jaxeff.config.qat import QatConfig
from jaxeff.models.flexq_forward import CodedServing
from jaxeff.models.frozen_int8 import dequantize_params, int8_abstract
from jaxeff.models.params import abstract_params
from jaxeff.models.lora import adapted_abstract, merge, scale_of
from jaxeff.models.sst import factorised_abstract, materialise
from jaxeff.models.qat import param_quantizer
from jaxeff.paths import Path, PathLike, as_path, is_object_store
from jaxeff.tasks import Meta, Task, task_class


@dataclasses.dataclass
class Trained:
    cfg: Config  # the model section and the task's sections as trained
    task: type[Task]
    model: nn.Module
    stored_params: Any  # the float parameters, or None where `unpack_params` gives them on first use
    meta: Meta
    step: int
    directory: Path
    is_export: bool
    qat: QatConfig = dataclasses.field(default_factory=QatConfig)  # the quantization the model runs with
    quantized: bool = False  # `params` already hold the quantized values (a packed export), else the float ones
    quantization: dict | None = None  # a packed export's config.json record (jaxeff/artifacts/packed.py)
    served: Any = None  # the tree the (wrapped) model runs with when it is not `params` (FlexQ: int8 codes + scales)
    # FlexQ: the float weights are built only when asked for (init_from, evaluation), so serving holds the codes alone
    unpack_params: Callable[[], Any] | None = None

    @functools.cached_property
    def params(self):
        """The float parameters in the model's own tree."""
        return self.unpack_params() if self.stored_params is None else self.stored_params

    @functools.cached_property
    def run_params(self):
        """The parameters the model runs with: a QAT workdir's float weights quantized as in its training forward;
        otherwise `params` (a packed export's are the unpacked ternary matrices already)."""
        if self.served is not None:
            return self.served
        return self.params if self.quantized else param_quantizer(self.qat, self.params)(self.params)

    @property
    def files_dir(self) -> Path | None:
        """Where relative files of the meta live: an export's own directory; a workdir's came from the config."""
        return self.directory if self.is_export else None

    def require(self, task_name: str, command: str) -> None:
        """ConfigError naming the command that serves this run when `command` serves another task."""
        if self.cfg.task != task_name:
            kind = "an export" if self.is_export else "a workdir"
            raise ConfigError(f"--workdir {self.directory} is {kind} of task {self.cfg.task!r}; `jaxeff {command}` "
                              f"is for task {task_name!r}: use `jaxeff {self.task.command} --workdir "
                              f"{self.directory}`")


def load_trained(path: PathLike) -> Trained:
    """A trained model from a training workdir (its newest restorable checkpoint) or from an export."""
    path = as_path(path, "--workdir")
    if is_export(path):
        return _from_export(path)
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return _from_workdir(path)
    raise ConfigError(f"'{path}' is neither a training workdir (config.yaml + checkpoints/) nor an export "
                      "(config.json + params/); pass --workdir of a `jaxeff train` run or of a `jaxeff export`")


def _from_export(export_dir: Path) -> Trained:
    cfg, meta, step = read_config(export_dir)
    task = task_class(cfg.task)
    model = task.build_inference_model(cfg, meta)
    params_dir = export_dir / "params"
    abstract = abstract_params(model, task.model_input(cfg, meta))
    record = read_quantization(export_dir)
    stored = ocp.StandardCheckpointer().restore(params_dir if is_object_store(params_dir) else params_dir.absolute(),
                                                abstract if record is None else packed_abstract(abstract, record))
    if record is None:
        return Trained(cfg, task, model, stored, meta, step, export_dir, True)
    common = dict(qat=qat_of_record(record), quantized=True, quantization=record)
    if record.get("kind") == FLEXQ:  # served as int8 codes through the quantized matmul; `params` hold the values
        served = unpack_flexq(stored, abstract, record, dequantize=False)
        return Trained(cfg, task, CodedServing(model, activation_bits_of(record), record["group_size"]), None, meta,
                       step, export_dir, True, **common, served=served,
                       unpack_params=lambda: unpack_params(stored, abstract, record))
    return Trained(cfg, task, model, unpack_params(stored, abstract, record), meta, step, export_dir, True, **common)


def checkpoint_task_meta(task: type[Task], cfg: Config, checkpoint_meta: dict, where: str) -> Meta:
    if "task_meta" in checkpoint_meta:
        return checkpoint_meta["task_meta"]
    try:
        return task.legacy_meta(cfg, checkpoint_meta)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _from_workdir(workdir: Path) -> Trained:
    cfg = read_saved_config(workdir / "config.yaml")
    task = task_class(cfg.task)
    store = CheckpointStore(workdir / "checkpoints", read_only=True)
    try:
        steps = store.steps_newest_first()
        if not steps:
            raise ConfigError(f"{workdir}/checkpoints holds no complete checkpoint yet; train first (jaxeff train)")
        meta = checkpoint_task_meta(task, cfg, store.read_meta(steps[0]), f"{workdir} checkpoint {steps[0]}")
        model = task.build_inference_model(cfg, meta)
        abstract = abstract_params(model, task.model_input(cfg, meta))
        if cfg.train.sst.rank:  # Sparse Spectral Training keeps factors: restore those, multiply back below
            abstract = factorised_abstract(abstract, cfg.train.sst.layers, cfg.model.d_model)
        lora = cfg.train.lora
        if lora.rank:  # LoRA keeps the frozen base and the adapters: restore both, merge below
            abstract = adapted_abstract(abstract, lora.layers, lora.rank, cfg.model.d_model)
        if cfg.train.optimizer == "zo" and cfg.train.zo.frozen_int8:  # frozen matrices in int8: dequantized below
            abstract = int8_abstract(abstract, cfg.train.zo.trainable)
        found = restore_newest(store, abstract, lambda step: store.restore_params(step, abstract))
    finally:
        store.close()
    if found is None:
        raise ConfigError(f"{workdir}/checkpoints holds no restorable checkpoint; train again (jaxeff train)")
    step, params = found
    params = dequantize_params(materialise(params))  # an ordinary model's tree (a no-op without train.sst / zo int8)
    if cfg.train.lora.rank:
        params = merge(params, scale_of(cfg.train.lora))  # W + (alpha / r) A B^T
    return Trained(cfg, task, model, params, meta, step, workdir, False, qat=cfg.train.qat)
