"""`jaxeff forecast`: the forecast of a forecasting run's workdir or export (the table and plot live with the task,
jaxeff/tasks/forecast_output.py)."""

from __future__ import annotations

from jaxeff.paths import Path

from jaxeff.artifacts.load import load_trained
from jaxeff.tasks.forecast_output import Forecast, forecast_series, format_forecast, plot_forecast


def forecast_from_workdir(path: str | Path, csv: str | None = None, future: bool = False) -> Forecast:
    """Forecast with a workdir or export: the last `horizon` steps (with the truth), or past the end (`future`)."""
    trained = load_trained(path)
    trained.require("forecast", "forecast")
    return forecast_series(trained.cfg, trained.model, trained.params, trained.meta, trained.step, csv, future)


__all__ = ["Forecast", "forecast_from_workdir", "format_forecast", "plot_forecast"]
