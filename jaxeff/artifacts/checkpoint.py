"""Orbax checkpoints of the train state and the grain iterator, atomic and resumable.

Layout: <workdir>/checkpoints/<step>/{params, train_state, data, meta}. `data` holds one grain
iterator state per process; `meta` records the process count and data settings, so that a
restore into a different topology rebuilds the iterators from the step instead.

Atomic saves: on a filesystem Orbax writes each step into a temporary directory and renames it when complete, so a
save killed midway leaves only a `*.orbax-checkpoint-tmp*` directory. An object store (gs://) has no rename: Orbax
writes the step in place and adds `commit_success.txt` last, so a step without it is incomplete. Either kind of
leftover is deleted on start (Orbax's own test of "temporary") and the run resumes from the last complete step.

A newest step that does not restore (a file missing or truncated by a full disk or an interrupted copy) is set
aside as `<step>.damaged-<n>`, never deleted, and the previous step is tried (`restore_newest`). On a filesystem
that is one rename; on an object store it is copy, then un-commit, then delete (`set_aside`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, TypeVar

import numpy as np

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxeff.errors import UserError
from jaxeff.paths import Path, PathLike, as_path, copy_tree, is_object_store

log = logging.getLogger("jaxeff")
T = TypeVar("T")



def remove_partial_saves(directory: Path) -> list[Path]:
    """Delete leftovers of interrupted saves (only process 0 touches the shared directory)."""
    removed = []
    if jax.process_index() == 0 and directory.is_dir():
        for path in sorted(directory.iterdir(), key=str):
            # `<step>.damaged-<n>` copies are kept whatever they hold (an interrupted set-aside may leave one half
            # copied, next to the intact step it copies).
            if path.is_dir() and ".damaged-" not in path.name and ocp.path.step.is_tmp_checkpoint(path):
                path.rmtree(missing_ok=True)
                removed.append(path)
    return removed


class CheckpointStore:
    """A thin wrapper over `ocp.CheckpointManager` that knows jaxeff's item names."""

    def __init__(self, directory: PathLike, keep: int = 3, async_save: bool = True, read_only: bool = False):
        directory = as_path(directory, "--workdir")
        self.directory = directory if is_object_store(directory) else directory.absolute()
        self.read_only = read_only
        self._newest_started: int | None = None
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

    def steps_newest_first(self) -> list[int]:
        return sorted(self.manager.all_steps(), reverse=True)

    def param_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """'path/to/param' -> shape, read from the checkpoint's metadata (no array data)."""
        return param_shapes(self.manager.item_metadata(step)["params"])

    def set_aside(self, step: int) -> Path:
        """Keep a damaged step as `<step>.damaged-<n>` (process 0), where it is no longer restored."""
        source = self.directory / str(step)
        n = 1
        while (self.directory / f"{step}.damaged-{n}").exists():
            n += 1
        target = self.directory / f"{step}.damaged-{n}"
        if jax.process_index() == 0:
            if is_object_store(source):
                _set_aside_without_rename(source, target)
            else:
                source.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxeff:set-aside-{step}")
        self.manager.reload()
        return target

    def save(self, step: int, state: dict[str, Any], data_iterator, data_meta: dict[str, Any] | None = None) -> None:
        """Start saving `step` (in the background when async); the trainer decides when to call this."""
        rest = {k: v for k, v in state.items() if k != "params"}
        meta = {"step": step, "process_count": jax.process_count(), **(data_meta or {})}
        args = ocp.args.Composite(params=ocp.args.StandardSave(state["params"]),
                                  train_state=ocp.args.StandardSave(rest),
                                  data=grain.checkpoint.CheckpointSave(data_iterator),
                                  meta=ocp.args.JsonSave(meta))
        self._newest_started = step
        self.manager.save(step, args=args, force=True)

    def writing_step(self) -> int | None:
        """The step of a save started and not yet complete on disk, or None. Safe to call from any thread."""
        started = self._newest_started
        return started if started is not None and self.manager.is_saving_in_progress() else None

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


def _set_aside_without_rename(source: Path, target: Path) -> None:
    """An object store's "rename": copy every object, then remove the commit marker (from then on the step is
    no longer a checkpoint), then delete the rest. Interrupted during the copy, the intact step is set aside again
    on the next start next to a partial copy; after it, the step is an uncommitted leftover and is deleted on start.
    Nothing of the damaged step is lost before its copy is complete."""
    copy_tree(source, target)
    marker = source / "commit_success.txt"
    if marker.exists():
        marker.unlink()
    source.rmtree(missing_ok=True)


def param_shapes(tree) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def shape_mismatch(saved: dict[str, tuple], model: dict[str, tuple], saved_name: str = "in the checkpoint") -> str | None:
    """The first parameter whose presence or shape differs, in words; None when all agree."""
    for name in sorted(set(saved) | set(model)):
        if name not in model:
            return f"parameter '{name}' {saved[name]} is {saved_name} but not in this model"
        if name not in saved:
            return f"parameter '{name}' {model[name]} of this model is not {saved_name}"
        if saved[name] != model[name]:
            return f"parameter '{name}' has shape {saved[name]} {saved_name} but {model[name]} in this model"
    return None


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(int(ok)))))


def warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"jaxeff: warning: {message}", file=sys.stderr, flush=True)


def restore_newest(store: CheckpointStore, abstract_params: Any,
                   restore_step: Callable[[int], T]) -> tuple[int, T] | None:
    """(step, restore_step(step)) for the newest step that restores; None when there is no checkpoint.

    A step whose parameter shapes differ from the model's (`abstract_params`) is a user error: another
    model wrote it. A step that cannot be read is damaged: one warning line, moved aside to
    `<step>.damaged-<n>` unless the store is read-only, and the next older step is tried. UserError
    when every step is damaged.
    """
    model_shapes = param_shapes(abstract_params)
    damaged: list[str] = []
    for step in store.steps_newest_first():
        result, error = None, None
        try:
            mismatch = shape_mismatch(store.param_shapes(step), model_shapes)
        except Exception as e:  # unreadable metadata: a damaged step
            mismatch, error = None, e
        if mismatch:
            raise UserError(f"checkpoint step {step} in {store.directory} was written by a different model: "
                            f"{mismatch}; use the model settings of the run that wrote it, or a new --workdir")
        if error is None:
            try:
                result = restore_step(step)
            except UserError:
                raise
            except Exception as e:  # a missing or truncated file in params, train_state or data
                error = e
        if _all_processes_agree(error is None):
            return step, result
        moved = None if store.read_only else store.set_aside(step)
        damaged.append(f"{step}" + (f" (now {moved.name})" if moved else ""))
        warn(f"checkpoint step {step} cannot be restored ({_reason(error) if error else 'on another process'}); "
             + (f"moved it aside to {moved} (nothing deleted); " if moved else "")
             + "trying the previous checkpoint")
    if damaged:
        raise UserError(f"no checkpoint in {store.directory} can be restored (damaged: {', '.join(damaged)}); "
                        "restore the files from a copy, or start a new run with another --workdir")
    return None
