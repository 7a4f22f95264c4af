"""Tasks: one module each (data, model contract, loss, metrics, output), chosen by `task:` in the config."""

from __future__ import annotations

import importlib

from jaxeff.errors import ConfigError
from jaxeff.tasks.base import Meta, Task

# task name -> "module:class"; a module is imported only when its task is used.
TASKS = {"lm": "jaxeff.tasks.lm:LanguageModelTask", "forecast": "jaxeff.tasks.forecast:ForecastTask"}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_task(cfg, platform: str | None = None, *, with_data: bool = True) -> Task:
    """The task object of a validated config: loads its data (`with_data=False`: only what the model, the batch
    shapes and the loss need, to compile the train step without the data)."""
    return task_class(cfg.task)(cfg, platform, with_data=with_data)


__all__ = ["Meta", "TASKS", "Task", "build_task", "task_class"]
