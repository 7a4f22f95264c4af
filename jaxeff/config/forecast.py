"""Sections of the forecasting task (`task: forecast`): its data (`forecast`) and its models
(`model.spacetime`, `model.linear`). See docs/models/spacetime.md."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from jaxeff.config.base import Float, PositiveInt, Section

SHIPPED_SERIES = ("co2", "sunspots", "macrodata")
"""Real series read from the statsmodels package (offline): weekly Mauna Loa CO2 (1958-2001), yearly sunspot
numbers (1700-2008), quarterly US macroeconomic data (1959-2009)."""


class ForecastConfig(Section):
    """Windowed time-series forecasting data (read when `task: forecast`); the window shuffle and loader workers
    are `data.shuffle_seed` and `data.num_workers`."""

    source: Literal["co2", "sunspots", "macrodata", "synthetic_ar", "csv"] = "co2"
    """`co2`, `sunspots`, `macrodata` (shipped with statsmodels), `synthetic_ar` (an AR process plus two seasons), `csv` (`forecast.csv`)"""
    csv: str | None = None
    """CSV in the ETT/Informer layout: a header row, an optional `date` column first, then numeric channels"""
    target: str | None = None
    """target channel for `features` S and MS; null = the last column"""
    features: Literal["M", "S", "MS"] = "S"
    """`M` all channels in and out, `S` the target only, `MS` all channels in, the target out"""
    columns: list[str] | None = None
    """channels to read (null = every numeric column); the target must be among them"""
    missing: Literal["error", "interpolate"] = "error"
    """empty cells: `error` names the first one, `interpolate` fills them linearly (shipped series always interpolate)"""
    lookback: PositiveInt = 104
    """input window length (time steps the model sees)"""
    horizon: PositiveInt = 26
    """forecast length (time steps predicted)"""
    stride: PositiveInt = 1
    """step between training windows"""
    split: list[Annotated[Float, Field(gt=0, lt=1)]] = Field(default_factory=lambda: [0.7, 0.1, 0.2],
                                                            min_length=3, max_length=3)
    """chronological train / validation / test fractions (sum 1); validation and test windows read their lookback from the split before"""
    window_norm: Literal["none", "last", "mean"] = "last"
    """per window: subtract the lookback's last value (`last`, NLinear's trick) or mean (`mean`, SpaceTime's) before the model and add it back after"""
    synthetic_length: PositiveInt = 6000
    """length of the `synthetic_ar` series"""
    synthetic_seed: int = 0
    """seed of the `synthetic_ar` series"""


class SpacetimeConfig(Section):
    """SpaceTime forecaster (`model.architecture: spacetime`): preprocessing filters, `model.n_layers` open-loop
    SSM encoder layers of width `model.d_model` with MLPs (`model.mlp_dim`), a closed-loop SSM decoder. SSM sizes
    come from `model.companion`."""

    ssm: Literal["companion", "diagonal"] = "companion"
    """state matrix of every SSM: `companion` (SpaceTime) or `diagonal` (complex diagonal, S4D-like baseline)"""
    difference_orders: list[Annotated[int, Field(ge=0, le=4)]] = Field(default_factory=lambda: [0, 1, 2])
    """preprocessing: differencing filters of these orders (0 = identity), assigned to channels in turn"""
    ma_windows: list[Annotated[int, Field(ge=2)]] = Field(default_factory=lambda: [4, 13, 52])
    """preprocessing: moving-average residual filters of these windows, assigned to channels after the differences"""
    decoder_kernels: PositiveInt | None = None
    """independent SSMs of the closed-loop decoder; null = `model.companion.n_kernels`"""


class LinearForecasterConfig(Section):
    """Linear baselines (`model.architecture: linear | dlinear`): one linear map lookback -> horizon shared by the
    channels. `linear` with `forecast.window_norm: last` is NLinear; `dlinear` adds a moving-average trend branch."""

    trend_window: Annotated[int, Field(ge=2)] = 25
    """DLinear's moving-average window (odd: centred, edges repeated)"""
