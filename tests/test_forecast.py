"""The forecasting task: data (CSV, splits, normaliser, windows), models, the trainer, `jaxeff forecast`, errors."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_user_error, rewind, run_jaxeff
from jaxeff.config import ConfigError, check_consistency, load_config
from jaxeff.data.series import read_csv_series, select_channels
from jaxeff.models.forecast import moving_average_trend
from jaxeff.models.spacetime import ClosedLoopDiagonal, DiagonalSSMs, companion_final_state
from jaxeff.tasks.forecast import ForecastData, window_offset
from pallas_kernels.companion_ssm import companion_ssm


def forecast_overrides(**extra) -> list[str]:
    base = {"task": "forecast", "model.architecture": "spacetime", "forecast.source": "synthetic_ar",
            "forecast.synthetic_length": 400, "forecast.lookback": 32, "forecast.horizon": 8,
            "model.d_model": 16, "model.n_layers": 1, "model.mlp_dim": 32, "model.companion.state_dim": 8,
            "model.companion.n_kernels": 4, "model.spacetime.ma_windows": "[4, 8]",
            "train.global_batch_size": 8, "train.steps": 8, "train.warmup_steps": 2, "train.eval_every": 4,
            "train.eval_batches": 1, "checkpoint.every": 4, "logging.every": 1, "logging.progress_bar": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def write_csv(path, rows: int = 120, channels=("HUFL", "MUFL", "OT"), seed: int = 0):
    rng = np.random.default_rng(seed)
    values = np.cumsum(rng.normal(size=(rows, len(channels))), axis=0) + 10
    lines = ["date," + ",".join(channels)]
    lines += [f"2016-07-{1 + i // 24:02d} {i % 24:02d}:00," + ",".join(f"{v:.5f}" for v in row)
              for i, row in enumerate(values)]
    path.write_text("\n".join(lines) + "\n")
    return values


# ------------------------------------------------------------------------------------------------- data


def test_csv_features_and_chronological_split(tmp_path):
    csv = tmp_path / "ett.csv"
    values = write_csv(csv)
    series = read_csv_series(csv)
    assert series.names == ["HUFL", "MUFL", "OT"] and series.dates[0] == "2016-07-01 00:00"
    np.testing.assert_allclose(series.values_TC, values, atol=1e-5)
    assert select_channels(series, "M", None).outputs == [0, 1, 2]
    assert select_channels(series, "S", None) == select_channels(series, "S", "OT")  # target defaults to the last
    ms = select_channels(series, "MS", "MUFL")
    assert ms.inputs == [0, 1, 2] and ms.outputs == [1] and ms.out_in_inputs == [1]

    cfg = load_config(None, forecast_overrides(**{"forecast.source": "csv", "forecast.csv": str(csv),
                                                  "forecast.features": "MS", "forecast.lookback": 10,
                                                  "forecast.horizon": 4}))
    data = ForecastData.build(cfg)
    # 120 rows: train 84, validation 12, test 24 target rows; validation/test take their lookback from before.
    train, val, test = (data.windows[k] for k in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (84 - 10 - 4 + 1, 12 - 4 + 1, 24 - 4 + 1)
    assert val.target_row(0) == 84 and test.target_row(0) == 96 and test.target_row(len(test) - 1) + 4 == 120
    normalised = (values - values[:84].mean(0)) / values[:84].std(0)
    item = test[3]
    np.testing.assert_allclose(item["inputs"], normalised[99 - 10 : 99], atol=1e-4)
    np.testing.assert_allclose(item["targets"], normalised[99 : 103, [2]], atol=1e-4)


def test_normaliser_is_fitted_on_the_training_split_only(tmp_path):
    csv = tmp_path / "a.csv"
    values = write_csv(csv, rows=100)
    overrides = forecast_overrides(**{"forecast.source": "csv", "forecast.csv": str(csv), "forecast.features": "M",
                                      "forecast.lookback": 8, "forecast.horizon": 4})
    first = ForecastData.build(load_config(None, overrides)).normaliser
    np.testing.assert_allclose(first.mean, values[:70].mean(0), atol=1e-5)
    np.testing.assert_allclose(first.std, values[:70].std(0), atol=1e-5)
    changed = values.copy()
    changed[70:] *= 100.0  # validation and test rows only
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([lines[0]] + [line.split(",")[0] + "," + ",".join(f"{v:.5f}" for v in row)
                                           for line, row in zip(lines[1:], changed)]) + "\n")
    second = ForecastData.build(load_config(None, overrides)).normaliser
    np.testing.assert_allclose(second.mean, first.mean, rtol=1e-9)
    np.testing.assert_allclose(second.std, first.std, rtol=1e-9)


def test_window_norm_offsets():
    x = jnp.arange(24.0).reshape(2, 4, 3)
    np.testing.assert_array_equal(window_offset(x, "last"), x[:, -1:])
    np.testing.assert_allclose(window_offset(x, "mean"), x.mean(1, keepdims=True))
    np.testing.assert_array_equal(window_offset(x, "none"), 0 * x[:, :1])


# ------------------------------------------------------------------------------------------------- models


def test_companion_final_state_equals_the_recurrence():
    rng = np.random.default_rng(0)
    k, d, h, length = 3, 6, 6, 20
    a, b = (jnp.asarray(rng.normal(size=(k, d)) * s, jnp.float32) for s in (0.3, 1.0))
    u = jnp.asarray(rng.normal(size=(2, length, h)), jnp.float32)
    rep = lambda p: jnp.tile(p, (h // k, 1))  # noqa: E731  (channel i uses kernel i mod k)
    _, expected = companion_ssm(u, rep(a), rep(b), rep(b), return_final_state=True)
    np.testing.assert_allclose(companion_final_state(u, a, b), expected, rtol=1e-4, atol=1e-5)


def test_diagonal_ssm_matches_its_recurrence():
    rng = np.random.default_rng(1)
    u = jnp.asarray(rng.normal(size=(2, 12, 4)), jnp.float32)
    ssm = DiagonalSSMs(n_kernels=2, state_dim=6)
    params = ssm.init(jax.random.key(0), u)
    p = params["params"]["ssm"]
    lam = np.exp(np.exp(p["log_dt"]) * (-np.exp(p["log_decay"]) + 1j * p["freq"]))
    b, c = p["b_re"] + 1j * p["b_im"], p["c_re"] + 1j * p["c_im"]
    x = np.zeros((2, 4, 3), complex)
    expected = []
    for t in range(12):
        x = lam[np.arange(4) % 2] * x + b[np.arange(4) % 2] * np.asarray(u[:, t])[..., None]
        expected.append(2 * np.real((c[np.arange(4) % 2] * x).sum(-1)) + np.asarray(u[:, t]))  # skip starts at 1
    np.testing.assert_allclose(ssm.apply(params, u), np.stack(expected, 1), rtol=1e-4, atol=1e-5)

    # closed loop: encode the same way, then x <- lam x + b (2 Re k.x)
    loop = ClosedLoopDiagonal(n_kernels=2, state_dim=6)
    lp = loop.init(jax.random.key(1), u, 3)
    q = lp["params"]["ssm"]
    lam = np.exp(np.exp(q["log_dt"]) * (-np.exp(q["log_decay"]) + 1j * q["freq"]))[np.arange(4) % 2]
    b, c, kk = ((q[f"{n}_re"] + 1j * q[f"{n}_im"])[np.arange(4) % 2] for n in ("b", "c", "k"))
    x = np.zeros((2, 4, 3), complex)
    for t in range(12):
        x = lam * x + b * np.asarray(u[:, t])[..., None]
    ys = []
    for _ in range(3):
        x = lam * x + b * (2 * np.real((kk * x).sum(-1)))[..., None]
        ys.append(2 * np.real((c * x).sum(-1)))
    np.testing.assert_allclose(loop.apply(lp, u, 3), np.stack(ys, 1), rtol=1e-4, atol=1e-5)


def test_dlinear_trend_is_a_centred_moving_average_with_repeated_edges():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 9, 2)), jnp.float32)
    padded = np.concatenate([np.repeat(x[:, :1], 2, 1), x, np.repeat(x[:, -1:], 2, 1)], 1)
    expected = np.stack([padded[:, t : t + 5].mean(1) for t in range(9)], 1)
    np.testing.assert_allclose(moving_average_trend(x, 5), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    ({"model.architecture": "lm"}, "task: forecast needs a forecasting model"),
    ({"forecast.split": "[0.7, 0.2, 0.2]"}, "must sum to 1"),
    ({"forecast.source": "csv"}, "forecast.source=csv needs forecast.csv"),
    ({"model.companion.n_kernels": 3}, "model.companion.n_kernels=3 does not divide model.d_model=16"),
    ({"model.spacetime.ma_windows": "[64]"}, "longer than forecast.lookback=32"),
    ({"model.architecture": "dlinear", "model.linear.trend_window": 4}, "must be odd"),
])
def test_forecast_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_consistency(load_config(None, forecast_overrides(**overrides)))
    with pytest.raises(ConfigError, match="is a forecasting model; set task: forecast"):
        check_consistency(load_config(None, ["model.architecture=spacetime"]))


def test_data_errors_exit_2_naming_the_problem(tmp_path):
    csv = tmp_path / "bad.csv"
    write_csv(csv, rows=60)
    lines = csv.read_text().splitlines()
    lines[7] = lines[7].rsplit(",", 1)[0] + ",n/a"
    csv.write_text("\n".join(lines) + "\n")
    common = ["train", "--config", "configs/spacetime-co2.yaml", "--workdir", str(tmp_path / "w"),
              "forecast.source=csv", f"forecast.csv={csv}"]
    assert_user_error(run_jaxeff(*common, "forecast.target=OT"), f"{csv}:8 column 'OT': 'n/a' is not a number")
    write_csv(csv, rows=60)
    assert_user_error(run_jaxeff(*common, "forecast.target=TEMP"), "forecast.target='TEMP' is not a channel")
    assert_user_error(run_jaxeff(*common, "forecast.horizon=40"), "fewer than forecast.lookback + forecast.horizon")


# ------------------------------------------------------------------------------------------------- trainer


def test_forecast_run_resumes_exactly_and_forecasts(tmp_path):
    from jaxeff.train import train

    full = train(load_config(None, forecast_overrides()), tmp_path / "full", console=False)
    assert full.final_step == 8 and "test" in full.sample and np.isfinite(list(full.losses.values())).all()
    resumed_dir = rewind(tmp_path / "full", tmp_path / "resumed", 4)
    resumed = train(load_config(None, forecast_overrides()), resumed_dir, console=False)
    assert [resumed.losses[s] for s in range(5, 9)] == [full.losses[s] for s in range(5, 9)]
    for x, y in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    proc = run_jaxeff("forecast", "--workdir", str(tmp_path / "full"), "--plot", str(tmp_path / "f.png"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.splitlines()
    assert table[0].split() == ["step", "ar", "forecast", "ar", "truth"] and len(table) == 1 + 8 + 2
    assert "MSE" in table[-2] and (tmp_path / "f.png").stat().st_size > 10_000
    assert_user_error(run_jaxeff("generate", "--workdir", str(tmp_path / "full"), "--prompt", "x"),
                      f"is a workdir of task 'forecast'; `jaxeff generate` is for task 'lm': use `jaxeff forecast "
                      f"--workdir {tmp_path / 'full'}`")

    export = tmp_path / "export"
    proc = run_jaxeff("export", "--workdir", str(tmp_path / "full"), "--out", str(export))
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_export = run_jaxeff("forecast", "--workdir", str(export))
    assert from_export.returncode == 0 and from_export.stdout == "\n".join(table[:-1]) + "\n", from_export.stderr[-2000:]
    import orbax.checkpoint as ocp  # the export's parameters are a plain Orbax checkpoint

    restored = ocp.StandardCheckpointer().restore(export / "params")
    for x, y in zip(jax.tree.leaves(full.params), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    shutil.rmtree(tmp_path / "resumed")
