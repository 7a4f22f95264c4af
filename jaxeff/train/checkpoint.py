"""Orbax checkpoints of the train state and the grain iterator, atomic and resumable.

Layout: <workdir>/checkpoints/<step>/{params, train_state, data}. Orbax writes each step into a
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
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, max_to_keep=None, save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save)
        handlers = {"params": ocp.StandardCheckpointHandler(), "train_state": ocp.StandardCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], data_iterator) -> None:
        """Start saving `step` (in the background when async); the trainer decides when to call this."""
        rest = {k: v for k, v in state.items() if k != "params"}
        args = ocp.args.Composite(params=ocp.args.StandardSave(state["params"]),
                                  train_state=ocp.args.StandardSave(rest),
                                  data=grain.checkpoint.CheckpointSave(data_iterator))
        self.manager.save(step, args=args, force=True)

    def save_final(self, step: int, state: dict[str, Any], data_iterator) -> None:
        """Make sure `step` is on disk (saving it unless the periodic save already did), then close."""
        self.wait()
        if self.latest_step() != step:
            self.save(step, state, data_iterator)
        self.close()

    def restore(self, step: int, abstract_state: dict[str, Any], data_iterator) -> dict[str, Any]:
        """Restore into the shardings carried by `abstract_state`; `data_iterator` is advanced in place."""
        rest = {k: v for k, v in abstract_state.items() if k != "params"}
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_state["params"]),
                                  train_state=ocp.args.StandardRestore(rest),
                                  data=grain.checkpoint.CheckpointRestore(data_iterator))
        restored = self.manager.restore(step, args=args)
        return {"params": restored["params"], **restored["train_state"]}

    def restore_params(self, step: int, abstract_params) -> Any:
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        return self.manager.restore(step, args=args)["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
