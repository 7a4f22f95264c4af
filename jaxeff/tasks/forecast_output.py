"""What `jaxeff forecast` shows: the forecast of a trained forecasting model, as a table or a plot.

By default the model forecasts the last `horizon` steps of the series from the `lookback` steps before them, so
the forecast can be compared with the truth; `--future` forecasts past the end instead. The normaliser is the
one recorded in the checkpoint (fitted on the training split when the run trained), not refitted on this data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxeff.config import Config, ConfigError
from jaxeff.data.series import Normaliser, load_series, select_channels
from jaxeff.tasks.forecast import predict


@dataclasses.dataclass
class Forecast:
    labels: list[str]  # one per forecast step (dates when the series has them)
    names: list[str]  # output channels
    forecast_FO: np.ndarray  # original units
    truth_FO: np.ndarray | None
    history_labels: list[str]
    history_LO: np.ndarray  # the lookback of the output channels, original units
    step: int  # training step of the checkpoint used


def forecast_series(cfg: Config, model, params, meta: dict, step: int, csv: str | None = None,
                    future: bool = False) -> Forecast:
    """Forecast the configured series (or `csv`): its last `horizon` steps (with the truth), or past the end
    (`future`). `meta` is the model's (channels, normaliser), `step` the training step shown."""
    f = cfg.forecast.model_copy()
    if csv is not None:
        f.source, f.csv = "csv", csv
    series = load_series(f)
    channels = select_channels(series, f.features, f.target)
    if meta["channels"] != series.names:
        raise ConfigError(f"{series.origin} has channels {series.names}, the model was trained on "
                          f"{meta['channels']}; pass a CSV with the same columns")
    normaliser = Normaliser.from_json(meta["normaliser"])
    end = len(series) if future else len(series) - f.horizon  # the forecast starts at row `end`
    if end < f.lookback:
        raise ConfigError(f"{series.origin} has {len(series)} time steps; forecasting needs forecast.lookback="
                          f"{f.lookback}" + ("" if future else f" + forecast.horizon={f.horizon}") + " of them")
    values = normaliser.apply(series.values_TC)
    x = values[end - f.lookback : end, channels.inputs][None].astype(np.float32)
    y = np.asarray(predict(model, params, x, f.window_norm, channels.out_in_inputs))[0].astype(np.float64)
    forecast = normaliser.invert(y, channels.outputs)
    truth = None if future else series.values_TC[end : end + f.horizon][:, channels.outputs]
    if series.dates is not None and not future:
        labels = series.dates[end : end + f.horizon]
    else:
        labels = [f"end+{i + 1}" if future else str(end + i) for i in range(f.horizon)]
    history_labels = series.dates[end - f.lookback : end] if series.dates else [str(i) for i in range(end - f.lookback, end)]
    return Forecast(labels, [series.names[i] for i in channels.outputs], forecast, truth, history_labels,
                    series.values_TC[end - f.lookback : end][:, channels.outputs], step)


def format_forecast(fc: Forecast) -> str:
    cols = []
    for name in fc.names:
        cols += [f"{name} forecast"] + ([f"{name} truth"] if fc.truth_FO is not None else [])
    width = max(12, *(len(c) for c in cols))
    lines = [f"{'step':<12} " + " ".join(f"{c:>{width}}" for c in cols)]
    for t, label in enumerate(fc.labels):
        cells = []
        for o in range(len(fc.names)):
            cells.append(fc.forecast_FO[t, o])
            if fc.truth_FO is not None:
                cells.append(fc.truth_FO[t, o])
        lines.append(f"{label:<12} " + " ".join(f"{v:>{width}.4g}" for v in cells))
    if fc.truth_FO is not None:
        diff = fc.forecast_FO - fc.truth_FO
        lines.append(f"MSE {np.mean(diff ** 2):.4g}, MAE {np.mean(np.abs(diff)):.4g} (original units, checkpoint "
                     f"step {fc.step})")
    return "\n".join(lines)


def plot_forecast(fc: Forecast, out: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib (or jaxeff[bench])") from None
    out = Path(out)
    if out.parent and not out.parent.is_dir():
        raise ConfigError(f"--plot {out}: the directory {out.parent} does not exist")
    n_hist, n_out = len(fc.history_labels), len(fc.names)
    fig, axes = plt.subplots(n_out, 1, figsize=(9, 3 * n_out), squeeze=False)
    t_hist, t_fc = np.arange(n_hist), np.arange(n_hist, n_hist + len(fc.labels))
    for o, ax in enumerate(axes[:, 0]):
        ax.plot(t_hist, fc.history_LO[:, o], color="0.3", label="history")
        if fc.truth_FO is not None:
            ax.plot(t_fc, fc.truth_FO[:, o], color="tab:green", label="truth")
        ax.plot(t_fc, fc.forecast_FO[:, o], color="tab:red", linestyle="--", label="forecast")
        ax.set_title(fc.names[o])
        ticks = np.linspace(0, n_hist + len(fc.labels) - 1, 5).astype(int)
        all_labels = fc.history_labels + fc.labels
        ax.set_xticks(ticks, [all_labels[i] for i in ticks])
        ax.legend(loc="upper left")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise ConfigError(f"--plot {out}: cannot write it ({e.strerror})") from None
    plt.close(fig)
    return out
