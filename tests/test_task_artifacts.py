"""Workdirs and exports of every task go through one loader: old ones (written before tasks recorded a model meta,
tests/data/before_task_meta) load, export, resume and fine-tune with the outputs the old code recorded; new ones
record the meta in every checkpoint and export."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxeff.artifacts.checkpoint import CheckpointStore
from jaxeff.artifacts.load import load_trained
from jaxeff.config import ConfigError, load_config
from jaxeff.infer import export_checkpoint
from jaxeff.infer.forecast import forecast_from_workdir
from jaxeff.infer.generate import load_inference_model
from jaxeff.models.decoding import generate_text
from jaxeff.train import train

OLD = Path(__file__).resolve().parent / "data" / "before_task_meta"
EXPECTED = json.loads((OLD / "expected.json").read_text())


def greedy(path) -> str:
    m = load_inference_model(path)
    return generate_text(m.model, m.params, m.tokenizer, "def ", 12, 0.0, 0, 0)


def assert_same_params(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), jax.device_get(a),
                 jax.device_get(b))


def params_at_step(workdir: Path, step: int):
    like = load_trained(workdir).params
    store = CheckpointStore(workdir / "checkpoints", read_only=True)
    try:
        return store.restore_params(step, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like))
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["workdir", "export"])
def test_old_language_model_artefacts_generate_what_the_old_code_did(kind):
    loaded = load_trained(OLD / f"lm_{kind}")
    assert (loaded.cfg.task, loaded.step, loaded.meta["vocab_size"]) == ("lm", 4, 259)
    assert greedy(OLD / f"lm_{kind}") == EXPECTED["lm"]["greedy"]


@pytest.mark.parametrize("arch", ["linear", "spacetime"])
@pytest.mark.parametrize("kind", ["workdir", "export"])
def test_old_forecasting_artefacts_forecast_what_the_old_code_did(arch, kind):
    fc = forecast_from_workdir(OLD / f"{arch}_{kind}")
    assert fc.step == 4
    np.testing.assert_allclose(fc.forecast_FO, EXPECTED[arch]["forecast"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["lm", "linear", "spacetime"])
def test_old_workdirs_export_in_the_new_format_with_identical_params(name, tmp_path):
    out, step = export_checkpoint(OLD / f"{name}_workdir", tmp_path / "export")
    record = json.loads((out / "config.json").read_text())
    assert record["format"] == "jaxeff-export-v2" and record["step"] == step == 4
    assert record["task"] == ("lm" if name == "lm" else "forecast")
    assert ("vocab_size" in record["meta"]) == (name == "lm") and ("normaliser" in record["meta"]) == (name != "lm")
    assert_same_params(load_trained(out).params, load_trained(OLD / f"{name}_export").params)
    if name == "lm":
        assert greedy(out) == EXPECTED["lm"]["greedy"]
    else:
        np.testing.assert_allclose(forecast_from_workdir(out).forecast_FO, EXPECTED[name]["forecast"], rtol=1e-6)


@pytest.mark.parametrize("name", ["lm", "linear"])
def test_this_code_trains_as_the_old_code_and_resumes_old_workdirs(name, tmp_path):
    overrides = EXPECTED[name]["overrides"]
    fresh = train(load_config(None, overrides), tmp_path / "fresh")
    np.testing.assert_allclose([fresh.losses[s] for s in (1, 2, 3, 4)], EXPECTED[name]["losses"], rtol=1e-5)
    store = CheckpointStore(tmp_path / "fresh" / "checkpoints", read_only=True)
    try:  # new checkpoints carry the model meta
        assert store.read_meta(4)["task_meta"] == load_trained(tmp_path / "fresh").meta
    finally:
        store.close()

    workdir = tmp_path / "old"
    shutil.copytree(OLD / f"{name}_workdir", workdir)
    resumed = train(load_config(None, [*overrides, "train.steps=5"]), workdir)
    assert sorted(resumed.losses) == [5] and np.isfinite(resumed.losses[5])
    assert load_trained(workdir).step == 5


def test_init_from_takes_a_forecasting_export_old_or_new(tmp_path):
    # Warmup starts at a learning rate of 0, so one step leaves the parameters where init_from put them.
    overrides = [o for o in EXPECTED["linear"]["overrides"] if not o.startswith(("train.steps", "train.warmup"))]
    overrides += ["train.steps=2", "train.warmup_steps=1", "train.eval_every=1", "checkpoint.every=1",
                  "checkpoint.keep=2"]
    new_export, _ = export_checkpoint(OLD / "linear_workdir", tmp_path / "new_export")
    for source in (OLD / "linear_export", new_export):
        workdir = tmp_path / f"from_{source.name}"
        train(load_config(None, [*overrides, f"train.init_from={source}"]), workdir)
        assert_same_params(params_at_step(workdir, 1), load_trained(source).params)
        assert not np.allclose(np.asarray(jax.tree.leaves(load_trained(workdir).params)[0]),
                               np.asarray(jax.tree.leaves(load_trained(source).params)[0]))  # step 2 did train
    with pytest.raises(ConfigError, match=r"holds a model of task 'lm', this run is task 'forecast'"):
        train(load_config(None, [*overrides, f"train.init_from={OLD / 'lm_export'}"]), tmp_path / "wrong")


@pytest.mark.parametrize("path, call, command", [
    ("linear_workdir", lambda p: load_inference_model(p), "jaxeff forecast"),
    ("linear_export", lambda p: load_inference_model(p), "jaxeff forecast"),
    ("lm_export", lambda p: forecast_from_workdir(p), "jaxeff generate"),
    ("lm_workdir", lambda p: forecast_from_workdir(p), "jaxeff generate")])
def test_each_front_end_names_the_command_for_another_task(path, call, command):
    with pytest.raises(ConfigError, match=f"use `{command} --workdir "):
        call(OLD / path)
