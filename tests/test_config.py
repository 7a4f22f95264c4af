"""Config loading: types, unknown keys, consistency checks, and the CLI's exit code 2."""

import subprocess
import textwrap

import pytest

from helpers import REPO, jaxeff_cmd, subprocess_env
from jaxeff.config import ConfigError, load_config, resolve_mesh_shape, validate


def test_defaults_and_overrides_are_typed():
    cfg = load_config(REPO / "configs/debug.yaml", ["train.steps=7", "train.learning_rate=1e-3",
                                                     "model.mixer_pattern=[attention, attention]"])
    assert cfg.train.steps == 7 and cfg.train.learning_rate == 1e-3
    assert cfg.model.mixer_pattern == ["attention", "attention"]
    assert isinstance(cfg.train.learning_rate, float)


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["train.learning_rate=1"]).train.learning_rate == 1.0
    with pytest.raises(ConfigError, match=r"train.steps: expected int, got 1.5"):
        load_config(None, ["train.steps=1.5"])


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", r"unknown config key 'train.stepz' \(did you mean 'steps'\?\)"),
    ("modle.d_model=3", r"unknown config key 'modle' \(did you mean 'model'\?\)"),
    ("train.steps=abc", r"train.steps: expected int, got 'abc'"),
    ("model.remat=some", r"model.remat: expected one of 'none' \| 'full' \| 'dots_saveable'"),
    ("train.jit=3", r"train.jit: expected bool"),
    ("data.paths=notalist", r"data.paths: expected a list"),
    ("train.steps", r"must look like key.sub=value"),
])
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, devices, message", [
    (["train.global_batch_size=6", "mesh.data=4"], 4, r"not divisible by the data-parallel size mesh.data\*mesh.fsdp=4"),
    (["train.global_batch_size=8", "train.microbatches=3"], 1, r"not divisible by train.microbatches=3"),
    (["model.d_model=130", "model.n_heads=4"], 1, r"model.n_heads=4 does not divide model.d_model=130"),
    (["model.n_heads=4", "model.n_kv_heads=3"], 1, r"model.n_kv_heads=3 must divide model.n_heads=4"),
    (["mesh.data=4", "mesh.tensor=4"], 8, r"= 16 devices, but only 8 are present"),
    (["mesh.data=-1", "mesh.fsdp=-1"], 8, r"only one axis may be -1"),
    (["mesh.data=-1", "mesh.tensor=3"], 8, r"does not divide the 8 devices"),
    (["mesh.tensor=8", "model.n_heads=4", "mesh.data=1"], 8, r"model.n_heads=4 is not divisible by mesh.tensor=8"),
    (["data.source=jsonl"], 1, r"data.source='jsonl' needs data.paths"),
    (["data.validation_fraction=1.5"], 1, r"data.validation_fraction=1.5: must be between 0 and 1"),
    (["train.steps=0"], 1, r"train.steps=0: must be positive"),
])
def test_inconsistent_values_fail_before_compiling(overrides, devices, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, overrides), devices)


def test_mesh_minus_one_takes_the_remaining_devices():
    cfg = load_config(None, ["mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2"])
    assert resolve_mesh_shape(cfg.mesh, 8) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}


def test_unknown_mixer_has_did_you_mean():
    from jaxeff.layers.registry import check_mixer_names

    with pytest.raises(ConfigError, match=r"unknown mixer 'atention' \(did you mean 'attention'\?\)"):
        check_mixer_names(load_config(None, ["model.mixer_pattern=[atention]"]).model)


@pytest.mark.parametrize("yaml_text, extra, message", [
    ("train:\n  stepss: 3\n", [], "unknown config key 'train.stepss'"),
    ("train:\n  global_batch_size: 6\n", ["mesh.data=4"], "train.global_batch_size=6"),
    ("model: [1, 2\n", [], "is not valid YAML"),
])
def test_cli_reports_user_errors_with_exit_code_2_and_no_traceback(tmp_path, yaml_text, extra, message):
    config = tmp_path / "bad.yaml"
    config.write_text(textwrap.dedent(yaml_text))
    proc = subprocess.run([*jaxeff_cmd(), "train", "--config", str(config), "--workdir", str(tmp_path / "w"), *extra],
                          capture_output=True, text=True, env=subprocess_env(devices=4), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_missing_config_file(tmp_path):
    proc = subprocess.run([*jaxeff_cmd(), "train", "--config", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
