"""Forecasting comparison: SpaceTime (companion SSMs) vs the same network with diagonal SSMs vs linear baselines.

    python benchmarks/forecast.py [--seeds 0 1] [--write docs/benchmarks.md]

Every model trains in the jaxeff trainer (task: forecast) on the same windows with the same optimiser settings,
on two real series shipped with statsmodels (weekly CO2, yearly sunspots) and one synthetic AR(4)-dominated
series; test-split MSE / MAE on the normalised scale (mean over seeds). For the synthetic series the oracle column is
the true AR(4) forecast (known coefficients and season): the floor no model can beat. One CPU device. Writes a table into
docs/benchmarks.md, a bar chart into docs/img/forecast_test_mse.png and the CO2 forecast of the SpaceTime run
into docs/img/spacetime_co2_forecast.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import jaxeff  # noqa: E402,F401  (XLA work-arounds before JAX starts)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import write_section  # noqa: E402
from jaxeff.config import load_config  # noqa: E402
from jaxeff.tasks.forecast import ForecastTask  # noqa: E402
from jaxeff.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

SYNTHETIC = "synthetic AR(4) (L96 H24)"
DATASETS = {  # name -> overrides on configs/spacetime-co2.yaml
    "co2 (weekly, L104 H26)": [],
    "sunspots (yearly, L40 H11)": ["forecast.source=sunspots", "forecast.lookback=40", "forecast.horizon=11",
                                   "model.spacetime.ma_windows=[4, 11]", "train.steps=400", "train.eval_every=100",
                                   "checkpoint.every=400"],
    SYNTHETIC: ["forecast.source=synthetic_ar", "forecast.lookback=96", "forecast.horizon=24",
                                  "model.spacetime.ma_windows=[4, 24]"],
}
MODELS = {
    "SpaceTime (companion)": [],
    "SpaceTime, diagonal SSM": ["model.spacetime.ssm=diagonal"],
    "NLinear (linear + last)": ["model.architecture=linear"],
    "DLinear": ["model.architecture=dlinear"],
}
COMMON = ["logging.progress_bar=false", "checkpoint.async_save=false"]


def run_one(overrides: list[str], workdir: Path):
    cfg = load_config(REPO / "configs/spacetime-co2.yaml", COMMON + overrides)
    start = time.perf_counter()
    result = train(cfg, workdir, console=False)
    seconds = time.perf_counter() - start
    params = jax.device_get(result.params)
    task = ForecastTask(load_config(REPO / "configs/spacetime-co2.yaml", COMMON + overrides))
    return task.split_metrics(params, "test"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--write", default=None, metavar="MARKDOWN", help="update this file (docs/benchmarks.md)")
    args = parser.parse_args()

    results: dict[tuple[str, str], list[dict]] = {}
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for d_name, d_over in DATASETS.items():
            for m_name, m_over in MODELS.items():
                for seed in args.seeds:
                    workdir = Path(tmp) / f"{len(times)}"
                    metrics, seconds = run_one(d_over + m_over + [f"train.seed={seed}"], workdir)
                    results.setdefault((d_name, m_name), []).append(metrics)
                    times.append(seconds)
                    print(f"{d_name:<28} {m_name:<26} seed {seed}: test MSE {metrics['mse']:.4f} "
                          f"MAE {metrics['mae']:.4f} ({seconds:.0f}s)", flush=True)
                    if d_name.startswith("co2") and m_name.startswith("SpaceTime (") and seed == args.seeds[0]:
                        _plot_co2(workdir)

    oracle = oracle_ar_metrics(DATASETS[SYNTHETIC])
    print(f"{SYNTHETIC:<28} {'oracle (true AR(4) + season)':<26}: test MSE {oracle['mse']:.4f} MAE {oracle['mae']:.4f}")
    header = "| series | " + " | ".join(MODELS) + " | oracle |"
    rows = [header, "|---|" + "---|" * (len(MODELS) + 1)]
    for d_name in DATASETS:
        cells = []
        best = min(np.mean([m["mse"] for m in results[(d_name, m)]]) for m in MODELS)
        for m_name in MODELS:
            mse = np.mean([m["mse"] for m in results[(d_name, m_name)]])
            mae = np.mean([m["mae"] for m in results[(d_name, m_name)]])
            cell = f"{mse:.4f} / {mae:.4f}"
            cells.append(f"**{cell}**" if mse == best else cell)
        best_possible = f"{oracle['mse']:.4f} / {oracle['mae']:.4f}" if d_name == SYNTHETIC else "-"
        rows.append(f"| {d_name} | " + " | ".join(cells) + f" | {best_possible} |")
    table = "\n".join(rows)
    print("\nTest MSE / MAE (normalised scale, mean over seeds " + ", ".join(map(str, args.seeds)) + ")\n" + table)
    _bar_chart(results)
    if args.write:
        body = (f"`python benchmarks/forecast.py --write docs/benchmarks.md`: test-split MSE / MAE on the normalised "
                f"scale, mean of seeds {args.seeds}, each model trained in the jaxeff trainer from "
                "`configs/spacetime-co2.yaml` (600 steps, batch 32; sunspots 400) with the overrides in the script; "
                f"one CPU device, {sum(times) / 60:.1f} minutes for all runs. Best per row in bold. "
                "NLinear = `model.architecture=linear` with `forecast.window_norm=last` (the config's default).\n\n"
                f"{table}\n\n![test MSE](img/forecast_test_mse.png)\n\n"
                "![SpaceTime forecast of CO2](img/spacetime_co2_forecast.png)")
        write_section(REPO / args.write, "forecast", "Forecasting: SpaceTime vs diagonal SSM vs linear (CPU)", body)
        print(f"wrote {args.write}")


def oracle_ar_metrics(overrides: list[str]) -> dict[str, float]:
    """The best possible forecast of the synthetic series: the true AR(4) recursion from the last 4 values
    (season removed, then added back), scored like the models on the test windows (normalised scale)."""
    from jaxeff.data.series import SYNTHETIC_AR_PHI, synthetic_season

    task = ForecastTask(load_config(REPO / "configs/spacetime-co2.yaml", COMMON + overrides))
    windows, raw = task.data.windows["test"], task.data.series.values_TC[:, 0]
    horizon, order = task.cfg.forecast.horizon, len(SYNTHETIC_AR_PHI)
    errors = []
    for i in range(len(windows)):
        t0 = windows.target_row(i)
        history = list(raw[t0 - order : t0] - synthetic_season(np.arange(t0 - order, t0)))
        for _ in range(horizon):
            history.append(float(SYNTHETIC_AR_PHI @ np.asarray(history[-order:])[::-1]))
        forecast = np.asarray(history[order:]) + synthetic_season(np.arange(t0, t0 + horizon))
        errors.append(task.data.normaliser.apply(forecast[:, None])[:, 0] - windows[i]["targets"][:, 0])
    errors = np.asarray(errors)
    return {"mse": float(np.mean(errors**2)), "mae": float(np.mean(np.abs(errors)))}


def _plot_co2(workdir: Path) -> None:
    from jaxeff.infer.forecast import forecast_from_workdir, plot_forecast

    plot_forecast(forecast_from_workdir(workdir), REPO / "docs/img/spacetime_co2_forecast.png")


def _bar_chart(results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(4 * len(DATASETS), 3.6))
    for ax, d_name in zip(axes, DATASETS):
        means = [np.mean([m["mse"] for m in results[(d_name, m_name)]]) for m_name in MODELS]
        ax.bar(range(len(MODELS)), means, color=["tab:red", "tab:purple", "tab:blue", "tab:cyan"])
        ax.set_xticks(range(len(MODELS)), [m.split(" (")[0].replace(", ", "\n") for m in MODELS], fontsize=7)
        ax.set_yscale("log")
        ax.set_title(d_name, fontsize=9)
        ax.set_ylabel("test MSE (normalised)")
    fig.tight_layout()
    fig.savefig(REPO / "docs/img/forecast_test_mse.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
