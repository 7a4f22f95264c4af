"""Forecasting models: `model.architecture` -> a Flax module mapping inputs x_BLC (normalised; L lookback steps,
C input channels) to a forecast y_BFO (F horizon steps, O output channels). SpaceTime lives in spacetime.py; the
linear baselines are here.

    linear   one Dense lookback -> horizon shared by every channel (NLinear with forecast.window_norm: last)
    dlinear  the same on a moving-average trend and on the remainder, summed (DLinear)
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxeff.config import ModelConfig
from jaxeff.models.spacetime import SpaceTime


def moving_average_trend(x_BLC, window: int):
    """Centred moving average over time with the edge values repeated (window odd)."""
    half = window // 2
    padded = jnp.concatenate([jnp.repeat(x_BLC[:, :1], half, axis=1), x_BLC, jnp.repeat(x_BLC[:, -1:], half, axis=1)],
                             axis=1)
    csum = jnp.cumsum(jnp.pad(padded, ((0, 0), (1, 0), (0, 0))), axis=1)
    return (csum[:, window:] - csum[:, :-window]) / window


class _TimeLinear(nn.Module):
    """[B, L, C] -> [B, F, C]: one linear map over time, shared by the channels."""

    horizon: int

    @nn.compact
    def __call__(self, x_BLC):
        return jnp.swapaxes(nn.Dense(self.horizon, name="dense")(jnp.swapaxes(x_BLC, 1, 2)), 1, 2)


class LinearForecaster(nn.Module):
    horizon: int
    out_in_inputs: tuple[int, ...]  # the input channel of each output channel
    trend_window: int | None = None  # None: plain linear; else DLinear

    @nn.compact
    def __call__(self, x_BLC):
        x_BLC = x_BLC.astype(jnp.float32)
        if self.trend_window is None:
            y_BFC = _TimeLinear(self.horizon, name="linear")(x_BLC)
        else:
            trend_BLC = moving_average_trend(x_BLC, self.trend_window)
            y_BFC = (_TimeLinear(self.horizon, name="trend")(trend_BLC)
                     + _TimeLinear(self.horizon, name="seasonal")(x_BLC - trend_BLC))
        return y_BFC[:, :, list(self.out_in_inputs)]


def build_forecaster(cfg: ModelConfig, horizon: int, out_in_inputs: list[int]) -> nn.Module:
    if cfg.architecture == "spacetime":
        return SpaceTime(cfg, len(out_in_inputs), horizon)
    if cfg.architecture == "linear":
        return LinearForecaster(horizon, tuple(out_in_inputs))
    if cfg.architecture == "dlinear":
        return LinearForecaster(horizon, tuple(out_in_inputs), cfg.linear.trend_window)
    raise ValueError(f"model.architecture={cfg.architecture!r} is not a forecasting model")
