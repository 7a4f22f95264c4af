"""`jaxeff forecast`: the forecast of a trained forecasting run, printed and optionally plotted.

By default the model forecasts the last `horizon` steps of the series from the `lookback` steps before them, so
the forecast can be compared with the truth; `--future` forecasts past the end instead. The normaliser is the
one recorded in the checkpoint (fitted on the training split when the run trained), not refitted on this data.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.config import Config, ConfigError, config_from_dict, read_saved_config
from jaxeff.data.series import Normaliser, Series, load_series, select_channels
from jaxeff.models.forecast import build_forecaster
from jaxeff.tasks.forecast import predict


@dataclasses.dataclass
class Forecast:
    labels: list[str]  # one per forecast step (dates when the series has them)
    names: list[str]  # output channels
    forecast_HO: np.ndarray  # original units
    truth_HO: np.ndarray | None
    history_labels: list[str]
    history_TO: np.ndarray  # the lookback of the output channels, original units
    step: int  # training step of the checkpoint used


FORECAST_EXPORT_FORMAT = "jaxeff-forecast-export-v1"


@dataclasses.dataclass
class LoadedForecaster:
    cfg: Config  # task, model and forecast sections as trained
    model: Any
    params: Any
    meta: dict  # normaliser, channel names (the checkpoint meta, or an export's config.json)
    step: int


def _abstract_params(model, init_shape):
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(init_shape, jnp.float32))["params"])
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)


def _model_for(cfg: Config, channel_names: list[str]):
    """The forecaster of `cfg` for a series with these channels, and its batch-of-one input shape."""
    f = cfg.forecast
    shape_only = Series(np.zeros((0, len(channel_names))), list(channel_names), None, "the trained model")
    channels = select_channels(shape_only, f.features, f.target)
    model = build_forecaster(cfg.model, f.horizon, channels.out_in_inputs)
    return model, (1, f.lookback, len(channels.inputs))


def _from_workdir(workdir: Path) -> LoadedForecaster:
    from jaxeff.train.checkpoint import CheckpointStore, restore_newest

    cfg = read_saved_config(workdir / "config.yaml")
    if cfg.task != "forecast":
        raise ConfigError(f"--workdir {workdir} is a language-model run (task: {cfg.task}); use `jaxeff generate`")
    store = CheckpointStore(workdir / "checkpoints", read_only=True)
    try:
        steps = store.steps_newest_first()
        if not steps:
            raise ConfigError(f"{workdir}/checkpoints holds no complete checkpoint yet; train first (jaxeff train)")
        meta = store.read_meta(steps[0])
        if "normaliser" not in meta:
            raise ConfigError(f"{workdir}: checkpoint {steps[0]} records no normaliser (not written by a forecasting "
                              "run)")
        model, init_shape = _model_for(cfg, meta["channels"])
        abstract = _abstract_params(model, init_shape)
        found = restore_newest(store, abstract, lambda s: (store.restore_params(s, abstract), store.read_meta(s)))
    finally:
        store.close()
    if found is None:
        raise ConfigError(f"{workdir}/checkpoints holds no restorable checkpoint; train again (jaxeff train)")
    step, (params, meta) = found
    return LoadedForecaster(cfg, model, params, meta, step)


def _from_export(export_dir: Path) -> LoadedForecaster:
    import orbax.checkpoint as ocp

    meta = json.loads((export_dir / "config.json").read_text())
    cfg = config_from_dict({"task": "forecast", "model": meta["model"], "forecast": meta["forecast"]},
                           where=f"{export_dir}/config.json: ")
    model, init_shape = _model_for(cfg, meta["channels"])
    params = ocp.StandardCheckpointer().restore((export_dir / "params").absolute(), _abstract_params(model, init_shape))
    return LoadedForecaster(cfg, model, params, meta, int(meta.get("step", 0)))


def load_forecaster(path: str | Path) -> LoadedForecaster:
    """A trained forecaster from a training workdir or from its export."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "params").is_dir():
        if json.loads((path / "config.json").read_text()).get("format") != FORECAST_EXPORT_FORMAT:
            raise ConfigError(f"--workdir {path} is a language-model export; use `jaxeff generate`")
        return _from_export(path)
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return _from_workdir(path)
    raise ConfigError(f"--workdir {path} is neither a forecasting workdir (config.yaml + checkpoints/) nor its export "
                      "(config.json + params/)")


def export_forecaster(workdir: str | Path, out: Path) -> int:
    """Write `out/params` (plain Orbax) and `out/config.json` (model and forecast settings, normaliser, channels)."""
    from jaxeff.infer.export import write_params
    from jaxeff.train.state import count_params

    loaded = load_forecaster(workdir)
    write_params(out, jax.device_get(loaded.params))
    meta = {"format": FORECAST_EXPORT_FORMAT, "task": "forecast", "architecture": loaded.cfg.model.architecture,
            "model": loaded.cfg.model.model_dump(mode="json"), "forecast": loaded.cfg.forecast.model_dump(mode="json"),
            "normaliser": loaded.meta["normaliser"], "channels": loaded.meta["channels"],
            "param_count": count_params(loaded.params), "step": loaded.step}
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    return loaded.step


def forecast_from_workdir(workdir: str | Path, csv: str | None = None, future: bool = False) -> Forecast:
    """Forecast with a workdir or export: the last `horizon` steps (with the truth), or past the end (`future`)."""
    loaded = load_forecaster(workdir)
    f, model, params, step = loaded.cfg.forecast, loaded.model, loaded.params, loaded.step
    if csv is not None:
        f.source, f.csv = "csv", csv
    series = load_series(f)
    channels = select_channels(series, f.features, f.target)
    if loaded.meta["channels"] != series.names:
        raise ConfigError(f"{series.origin} has channels {series.names}, the model was trained on "
                          f"{loaded.meta['channels']}; pass a CSV with the same columns")
    normaliser = Normaliser.from_json(loaded.meta["normaliser"])
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
        cols += [f"{name} forecast"] + ([f"{name} truth"] if fc.truth_HO is not None else [])
    width = max(12, *(len(c) for c in cols))
    lines = [f"{'step':<12} " + " ".join(f"{c:>{width}}" for c in cols)]
    for t, label in enumerate(fc.labels):
        cells = []
        for o in range(len(fc.names)):
            cells.append(fc.forecast_HO[t, o])
            if fc.truth_HO is not None:
                cells.append(fc.truth_HO[t, o])
        lines.append(f"{label:<12} " + " ".join(f"{v:>{width}.4g}" for v in cells))
    if fc.truth_HO is not None:
        diff = fc.forecast_HO - fc.truth_HO
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
        ax.plot(t_hist, fc.history_TO[:, o], color="0.3", label="history")
        if fc.truth_HO is not None:
            ax.plot(t_fc, fc.truth_HO[:, o], color="tab:green", label="truth")
        ax.plot(t_fc, fc.forecast_HO[:, o], color="tab:red", linestyle="--", label="forecast")
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
