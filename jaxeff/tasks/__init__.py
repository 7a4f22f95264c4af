"""Tasks: one module each (data, model, loss, metrics, output), chosen by `task:` in the config."""

from __future__ import annotations

from jaxeff.tasks.base import Task


def build_task(cfg, platform: str | None = None) -> Task:
    """The task object of a validated config (imports only the task in use)."""
    if cfg.task == "forecast":
        from jaxeff.tasks.forecast import ForecastTask

        return ForecastTask(cfg)
    from jaxeff.tasks.lm import LanguageModelTask

    return LanguageModelTask(cfg, platform)


__all__ = ["Task", "build_task"]
