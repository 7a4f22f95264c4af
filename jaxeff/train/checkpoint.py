"""Orbax checkpoints of the train state and the grain iterator, atomic and resumable.

Layout: <workdir>/checkpoints/<step>/{params, train_state, data, meta}. `data` holds one grain
iterator state per process; `meta` records the process count and data settings, so that a
restore into a different topology rebuilds the iterators from the step instead. Orbax writes each step into a
temporary directory and renames it when complete, so a save killed midway leaves only a
`*.orbax-checkpoint-tmp*` directory: we delete those on start and resume from the last complete
step.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger("jaxeff")

TMP_MARKER = ".orbax-checkpoint-tmp"


def remove_partial_saves(directory: Path) -> list[Path]:
    """Delete leftovers of interrupted saves (only process 0 touches the shared directory)."""
    removed = []
    if directory.is_dir() and jax.process_index() == 0:
        for path in sorted(directory.iterdir()):
            if TMP_MARKER in path.name:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


class CheckpointStore:
    """A thin wrapper over `ocp.CheckpointManager` that knows jaxeff's item names."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if not read_only:
            for path in remove_partial_saves(self.directory):
                log.warning("removed incomplete checkpoint %s (a save was interrupted)", path.name)
            if jax.process_count() > 1:  # nobody opens the directory while process 0 cleans it
                multihost_utils.sync_global_devices("jaxeff:checkpoint-cleanup")
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, max_to_keep=None, save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save)
        handlers = {"params": ocp.StandardCheckpointHandler(), "train_state": ocp.StandardCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], data_iterator, data_meta: dict[str, Any] | None = None) -> None:
        """Start saving `step` (in the background when async); the trainer decides when to call this."""
        rest = {k: v for k, v in state.items() if k != "params"}
        meta = {"step": step, "process_count": jax.process_count(), **(data_meta or {})}
        args = ocp.args.Composite(params=ocp.args.StandardSave(state["params"]),
                                  train_state=ocp.args.StandardSave(rest),
                                  data=grain.checkpoint.CheckpointSave(data_iterator),
                                  meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def save_final(self, step: int, state: dict[str, Any], data_iterator, data_meta=None) -> None:
        """Make sure `step` is on disk (saving it unless the periodic save already did), then close."""
        self.wait()
        if self.latest_step() != step:
            self.save(step, state, data_iterator, data_meta)
        self.close()

    def restore(self, step: int, abstract_state: dict[str, Any], data_iterator,
                data_meta: dict[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
        """Restore into the shardings carried by `abstract_state`.

        The data iterator is advanced in place when the checkpoint was written by the same number
        of processes with the same data settings (`data_meta`); otherwise it is left alone and the
        second return value is False: the caller rebuilds its iterators from the step.
        """
        saved_meta = self.read_meta(step)
        same_data = (saved_meta.get("process_count", jax.process_count()) == jax.process_count()
                     and all(saved_meta.get(k, v) == v for k, v in (data_meta or {}).items()))
        rest = {k: v for k, v in abstract_state.items() if k != "params"}
        items = {"params": ocp.args.StandardRestore(abstract_state["params"]),
                 "train_state": ocp.args.StandardRestore(rest)}
        if same_data:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return {"params": restored["params"], **restored["train_state"]}, same_data

    def read_meta(self, step: int) -> dict[str, Any]:
        if not (self.directory / str(step) / "meta").exists():
            return {}
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore_params(self, step: int, abstract_params) -> Any:
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        return self.manager.restore(step, args=args)["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
