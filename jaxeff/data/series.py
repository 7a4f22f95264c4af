"""Time series for the forecasting task: reading, chronological splits, normalisation, windows.

A series is a float64 array `values_TC` (time x channels) with channel names and optional date labels.
Sources: CSV files in the ETT/Informer layout (header row; a first column named `date` holds labels; the
other columns are numeric channels), real series shipped inside the statsmodels package (read as CSV
files, offline), and a synthetic AR-dominated series.

Splits are chronological (train, then validation, then test); validation and test windows take their
lookback from the split before, as in the Informer benchmarks, so every target time step belongs to
exactly one split. The normaliser is fitted on the training rows only.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import importlib.util
import json
import math

import numpy as np

from jaxeff.config import ConfigError
from jaxeff.config.forecast import ForecastConfig
from jaxeff.paths import Path, PathLike, as_path


@dataclasses.dataclass
class Series:
    values_TC: np.ndarray  # float64
    names: list[str]
    dates: list[str] | None
    origin: str  # where it came from, for messages and the header

    def __len__(self) -> int:
        return len(self.values_TC)


# ---------------------------------------------------------------------------------------------- reading


def _parse_number(text: str, where: str) -> float:
    text = text.strip()
    if text == "" or text.lower() in ("nan", "na", "null"):
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number; forecasting channels must be numeric "
                          "(drop the column with forecast.columns)") from None
    if math.isinf(value):
        raise ConfigError(f"{where}: {text!r} is infinite; fix the value in the file")
    return value


def read_csv_series(path: PathLike, *, date_columns: tuple[str, ...] | None = None, columns: list[str] | None = None,
                    missing: str = "error", origin: str | None = None) -> Series:
    """Channels of a CSV file. `date_columns`: label columns (None: the first column if it is named `date`)."""
    path = as_path(path, "forecast.csv")
    if path.is_dir():
        raise ConfigError(f"forecast.csv={path} is a directory; pass a CSV file")
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    except FileNotFoundError:
        raise ConfigError(f"forecast.csv={path} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save the CSV as UTF-8") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if len(rows) < 2:
        raise ConfigError(f"{path}: needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if date_columns is None:
        date_columns = (header[0],) if header[0].lower() == "date" else ()
    numeric = [h for h in header if h not in date_columns]
    if columns is not None:
        absent = [c for c in columns if c not in numeric]
        if absent:
            raise ConfigError(f"forecast.columns: {absent} not in {path} (its channels: {', '.join(numeric)})")
        numeric = list(columns)
    if not numeric:
        raise ConfigError(f"{path}: no numeric channel columns (header: {', '.join(header)})")
    index = {h: i for i, h in enumerate(header)}
    values = np.empty((len(rows) - 1, len(numeric)), np.float64)
    dates = [] if date_columns else None
    for r, row in enumerate(rows[1:]):
        line = r + 2
        if len(row) != len(header):
            raise ConfigError(f"{path}:{line}: {len(row)} cells, the header has {len(header)}")
        for c, name in enumerate(numeric):
            values[r, c] = _parse_number(row[index[name]], f"{path}:{line} column {name!r}")
        if dates is not None:
            dates.append("-".join(row[index[d]].strip() for d in date_columns))
    values = _fill_missing(values, numeric, missing, path)
    return Series(values, numeric, dates, origin or str(path))


def _fill_missing(values_TC: np.ndarray, names: list[str], missing: str, path) -> np.ndarray:
    gaps = np.isnan(values_TC)
    if not gaps.any():
        return values_TC
    if missing == "error":
        row, col = map(int, np.argwhere(gaps)[0])
        raise ConfigError(f"{path}:{row + 2} column {names[col]!r}: the value is missing ({int(gaps.sum())} missing in "
                          "all); fill the gaps or set forecast.missing=interpolate")
    out = values_TC.copy()
    t = np.arange(len(out))
    for c in range(out.shape[1]):
        known = ~gaps[:, c]
        if not known.any():
            raise ConfigError(f"{path}: column {names[c]!r} has no values")
        out[:, c] = np.interp(t, t[known], out[known, c])  # linear inside, constant beyond the ends
    return out


# Shipped with statsmodels: (CSV inside statsmodels/datasets, label columns).
_SHIPPED = {
    "co2": ("co2/co2.csv", ("date",)),
    "sunspots": ("sunspots/sunspots.csv", ("YEAR",)),
    "macrodata": ("macrodata/macrodata.csv", ("year", "quarter")),
}


def shipped_series_path(name: str) -> Path:
    """The CSV of a statsmodels dataset, located without importing statsmodels (and pandas)."""
    spec = importlib.util.find_spec("statsmodels")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"forecast.source={name} reads the series shipped with statsmodels, which is not installed; "
                          "pip install statsmodels (a jaxeff dependency)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / _SHIPPED[name][0]


# x_t = sum_j phi_j x_{t-j} + e_t with characteristic roots 0.9, -0.8, 0.5 +- 0.5i (stationary).
SYNTHETIC_AR_PHI = -np.real(np.poly([0.9, -0.8, 0.5 + 0.5j, 0.5 - 0.5j]))[1:]


def synthetic_season(t: np.ndarray) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * t / 24)


def synthetic_ar_series(length: int, seed: int) -> Series:
    """The AR(4) process SYNTHETIC_AR_PHI with unit noise plus a weak period-24 season (synthetic_season)."""
    rng = np.random.default_rng(seed)
    phi = SYNTHETIC_AR_PHI
    burn = 200
    noise = rng.normal(0.0, 1.0, length + burn)
    x = np.zeros(length + burn)
    for t in range(4, length + burn):
        x[t] = phi @ x[t - 4 : t][::-1] + noise[t]
    season = synthetic_season(np.arange(length))
    values = (x[burn:] + season)[:, None]
    return Series(values, ["ar"], None, f"synthetic AR(4) phi={np.round(phi, 3).tolist()} + season 24, seed {seed}")


def load_series(cfg: ForecastConfig) -> Series:
    if cfg.source == "synthetic_ar":
        return synthetic_ar_series(cfg.synthetic_length, cfg.synthetic_seed)
    if cfg.source == "csv":
        return read_csv_series(cfg.csv, columns=cfg.columns, missing=cfg.missing)
    path = shipped_series_path(cfg.source)
    # co2 has gaps (weeks without a measurement): shipped series are always interpolated.
    return read_csv_series(path, date_columns=_SHIPPED[cfg.source][1], columns=cfg.columns, missing="interpolate",
                           origin=f"{cfg.source} (statsmodels)")


# ---------------------------------------------------------------------------------------------- features


@dataclasses.dataclass(frozen=True)
class Channels:
    """Which series channels go in and come out; `out_in_inputs[j]` is output j's position among the inputs."""

    inputs: list[int]
    outputs: list[int]
    out_in_inputs: list[int]


def select_channels(series: Series, features: str, target: str | None) -> Channels:
    target = series.names[-1] if target is None else target
    if target not in series.names:
        raise ConfigError(f"forecast.target={target!r} is not a channel of {series.origin} "
                          f"(channels: {', '.join(series.names)})")
    t = series.names.index(target)
    every = list(range(len(series.names)))
    inputs, outputs = {"M": (every, every), "S": ([t], [t]), "MS": (every, [t])}[features]
    return Channels(inputs, outputs, [inputs.index(o) for o in outputs])


# ---------------------------------------------------------------------------------------------- splits


@dataclasses.dataclass(frozen=True)
class SplitBounds:
    """Rows [start, stop) of each split's targets; a window's lookback may reach back before `start`."""

    train: tuple[int, int]
    validation: tuple[int, int]
    test: tuple[int, int]


def chronological_split(n: int, fractions: list[float], lookback: int, horizon: int, origin: str) -> SplitBounds:
    n_train = int(round(n * fractions[0]))
    n_val = int(round(n * fractions[1]))
    bounds = SplitBounds((0, n_train), (n_train, n_train + n_val), (n_train + n_val, n))
    need = {"train": lookback + horizon, "validation": horizon, "test": horizon}
    for name, (start, stop) in dataclasses.asdict(bounds).items():
        if stop - start < need[name]:
            what = "forecast.lookback + forecast.horizon" if name == "train" else "forecast.horizon"
            raise ConfigError(
                f"forecast: the {name} split of {origin} has {stop - start} time steps ({n} in all, forecast.split="
                f"{fractions}), fewer than {what} = {need[name]}; shorten forecast.horizon / forecast.lookback or "
                "change forecast.split")
    return bounds


@dataclasses.dataclass(frozen=True)
class Normaliser:
    """Per-channel (x - mean) / std, fitted on the training rows only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, train_TC: np.ndarray) -> "Normaliser":
        std = train_TC.std(axis=0)
        return cls(train_TC.mean(axis=0), np.where(std > 1e-12, std, 1.0))  # a constant channel keeps its scale

    def apply(self, x_TC: np.ndarray) -> np.ndarray:
        return (x_TC - self.mean) / self.std

    def invert(self, y_FO: np.ndarray, channels: list[int]) -> np.ndarray:
        """A forecast [F, O] of the series channels `channels` back to original units."""
        return y_FO * self.std[channels] + self.mean[channels]

    def to_json(self) -> dict:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_json(cls, d: dict) -> "Normaliser":
        return cls(np.asarray(d["mean"], np.float64), np.asarray(d["std"], np.float64))


# ---------------------------------------------------------------------------------------------- windows


class ForecastWindows:
    """Random-access grain source: item i is the window whose targets start at row start + i * stride:
    {"inputs": float32[lookback, inputs], "targets": float32[horizon, outputs]}."""

    def __init__(self, values_TC: np.ndarray, channels: Channels, bounds: tuple[int, int], lookback: int, horizon: int,
                 stride: int, name: str):
        self.values = values_TC.astype(np.float32)
        self.channels, self.lookback, self.horizon, self.stride, self.name = channels, lookback, horizon, stride, name
        start, stop = bounds
        self.first_target = max(start, lookback)
        self._len = (stop - horizon - self.first_target) // stride + 1
        self._digest = hashlib.sha1(self.values.tobytes() + json.dumps(
            [channels.inputs, channels.outputs, bounds, lookback, horizon, stride]).encode()).hexdigest()[:12]

    def __len__(self) -> int:
        return self._len

    def target_row(self, i: int) -> int:
        return self.first_target + int(i) * self.stride

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        t = self.target_row(i)
        return {"inputs": self.values[t - self.lookback : t][:, self.channels.inputs],
                "targets": self.values[t : t + self.horizon][:, self.channels.outputs]}

    def all(self) -> dict[str, np.ndarray]:
        """Every window stacked (for test metrics)."""
        items = [self[i] for i in range(len(self))]
        return {k: np.stack([it[k] for it in items]) for k in items[0]}

    def __repr__(self) -> str:
        return (f"ForecastWindows(name={self.name}, lookback={self.lookback}, horizon={self.horizon}, "
                f"stride={self.stride}, windows={self._len}, digest={self._digest})")
