"""Time-series forecasting: windows of a series in, the next `horizon` steps out, MSE loss.

Data flow: series (forecast.source) -> chronological train/validation/test split -> per-channel normaliser fitted
on the training rows (recorded in every checkpoint's meta) -> windows {inputs [L, C_in], targets [H, C_out]}.
Around the model, `forecast.window_norm` subtracts each window's last value or mean and adds it back to the
forecast. Metrics: MSE / MAE on the normalised scale and on the original one (times the channel's std).

Model meta: `{"channels": names of the series' channels, "inputs": ..., "outputs": ..., "normaliser": ...}`: the
model's shape follows from the channels and `forecast.features` / `forecast.target`; `jaxeff forecast` normalises
new data with the recorded normaliser (fitted on the training rows), never a refitted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.config import Config, ConfigError
from jaxeff.data.pipeline import fixed_batches, shuffled_batches
from jaxeff.data.series import (Channels, ForecastWindows, Normaliser, Series, chronological_split, load_series,
                                select_channels)
from jaxeff.models.forecast import build_forecaster
from jaxeff.tasks.base import Batch, Meta, Task

METRIC_BATCH = 256  # windows per call when scoring a whole split


def _identity(example):
    return example


def window_offset(x_BLC, window_norm: str):
    """[B, 1, C] subtracted from a window before the model and added back to its forecast."""
    if window_norm == "last":
        return x_BLC[:, -1:, :]
    if window_norm == "mean":
        return jnp.mean(x_BLC, axis=1, keepdims=True)
    return jnp.zeros_like(x_BLC[:, :1, :])


def predict(model, params, x_BLC, window_norm: str, out_in_inputs: list[int]):
    """Forecast [B, H, C_out] on the normalised scale."""
    offset = window_offset(x_BLC, window_norm)
    y = model.apply({"params": params}, x_BLC - offset)
    return y + offset[:, :, list(out_in_inputs)]


def error_metrics(pred_BFO, target_BFO, std_O) -> dict[str, jax.Array]:
    diff = pred_BFO - target_BFO
    return {"mse": jnp.mean(diff**2), "mae": jnp.mean(jnp.abs(diff)),
            "mse_original": jnp.mean((diff * std_O) ** 2), "mae_original": jnp.mean(jnp.abs(diff * std_O))}


@dataclasses.dataclass
class ForecastData:
    """Everything the forecasting task and `jaxeff forecast` derive from the config's data settings."""

    series: Series
    channels: Channels
    normaliser: Normaliser
    windows: dict[str, ForecastWindows]  # train / validation / test

    @classmethod
    def build(cls, cfg: Config) -> "ForecastData":
        f = cfg.forecast
        series = load_series(f)
        channels = select_channels(series, f.features, f.target)
        bounds = chronological_split(len(series), f.split, f.lookback, f.horizon, series.origin)
        normaliser = Normaliser.fit(series.values_TC[slice(*bounds.train)])
        values = normaliser.apply(series.values_TC)
        strides = {"train": f.stride, "validation": 1, "test": 1}
        windows = {name: ForecastWindows(values, channels, getattr(bounds, name), f.lookback, f.horizon, strides[name],
                                         name) for name in strides}
        return cls(series, channels, normaliser, windows)

    def output_std(self) -> np.ndarray:
        return self.normaliser.std[self.channels.outputs].astype(np.float32)


def channels_of(cfg: Config, meta: Meta) -> Channels:
    """The input and output channels of the model, from the series' channel names the meta records."""
    f = cfg.forecast
    shape_only = Series(np.zeros((0, len(meta["channels"]))), list(meta["channels"]), None, "the trained model")
    return select_channels(shape_only, f.features, f.target)


class ForecastTask(Task):
    name = "forecast"
    command = "forecast"
    export_sections = ("forecast",)
    unit = "windows"

    @classmethod
    def build_model(cls, cfg: Config, meta: Meta, platform: str | None = None):
        return build_forecaster(cfg.model, cfg.forecast.horizon, channels_of(cfg, meta).out_in_inputs)

    @classmethod
    def model_input(cls, cfg: Config, meta: Meta) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((1, cfg.forecast.lookback, len(channels_of(cfg, meta).inputs)), np.float32)

    @classmethod
    def legacy_meta(cls, cfg: Config, checkpoint_meta) -> Meta:
        if "normaliser" not in checkpoint_meta:
            raise ConfigError("the checkpoint records no normaliser (not written by a forecasting run)")
        return {k: checkpoint_meta[k] for k in ("channels", "inputs", "outputs", "normaliser")}

    # ------------------------------------------------------------------ training

    def load_data(self) -> Meta:
        self.data = ForecastData.build(self.cfg)
        self._std_O = jnp.asarray(self.data.output_std())
        self._score = jax.jit(self.eval_metrics)
        ch, names = self.data.channels, self.data.series.names
        return {"channels": names, "inputs": [names[i] for i in ch.inputs], "outputs": [names[i] for i in ch.outputs],
                "normaliser": self.data.normaliser.to_json()}

    def predict(self, params, x_BLC):
        f = self.cfg.forecast
        return predict(self.model, params, x_BLC, f.window_norm, self.data.channels.out_in_inputs)

    def batch_shapes(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        f, ch = self.cfg.forecast, self.data.channels
        return {"inputs": jax.ShapeDtypeStruct((global_batch_size, f.lookback, len(ch.inputs)), np.float32),
                "targets": jax.ShapeDtypeStruct((global_batch_size, f.horizon, len(ch.outputs)), np.float32)}

    def train_batches(self, per_process_batch: int, start_row: int = 0):
        d = self.cfg.data
        return shuffled_batches(self.data.windows["train"], _identity, d.shuffle_seed, d.num_workers,
                                per_process_batch, start_row)

    def eval_batches(self, per_process_batch: int, n_batches: int):
        return fixed_batches(self.data.windows["validation"], _identity, per_process_batch, n_batches)

    def loss(self, params, batch: Batch):
        diff = self.predict(params, batch["inputs"]) - batch["targets"]
        return jnp.mean(diff**2), {"aux/mae": jnp.mean(jnp.abs(diff))}

    def eval_metrics(self, params, batch: Batch) -> dict[str, jax.Array]:
        m = error_metrics(self.predict(params, batch["inputs"]), batch["targets"], self._std_O)
        return {"loss": m["mse"], **m}

    @property
    def data_meta(self) -> dict[str, Any]:
        return {"num_workers": self.cfg.data.num_workers}

    def describe(self) -> str:
        w = self.data.windows
        return (f"{self.data.series.origin}: {len(self.data.series):,} steps x {len(self.data.series.names)} channels, "
                f"windows train {len(w['train'])} / validation {len(w['validation'])} / test {len(w['test'])}")

    def split_metrics(self, params, split: str) -> dict[str, float]:
        """Metrics over every window of a split (weighted by window count; one compile per batch shape)."""
        windows = self.data.windows[split].all()
        n = len(windows["inputs"])
        totals: dict[str, float] = {}
        for start in range(0, n, METRIC_BATCH):
            part = {k: v[start : start + METRIC_BATCH] for k, v in windows.items()}
            for k, v in jax.device_get(self._score(params, part)).items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(part["inputs"])
        return {k: v / n for k, v in totals.items()}

    def finish(self, params_host, progress) -> str:
        rows = ["split        windows      MSE      MAE   MSE (orig)   MAE (orig)"]
        for split in ("validation", "test"):
            m = self.split_metrics(params_host, split)
            rows.append(f"{split:<12} {len(self.data.windows[split]):>7} {m['mse']:>8.4f} {m['mae']:>8.4f} "
                        f"{m['mse_original']:>12.4g} {m['mae_original']:>12.4g}")
        text = "\n".join(rows)
        progress.print(f"--- forecast metrics (normalised scale, and original units) ---\n{text}\n---")
        return text
