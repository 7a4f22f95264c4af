"""Config loading: types, unknown keys, consistency checks, and the CLI's exit code 2."""

import textwrap

import pytest

from helpers import REPO, assert_user_error, run_jaxeff
from jaxeff.config import ConfigError, load_config, validate
from jaxeff.parallel.mesh import resolve_mesh_shape


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
    (["train.global_batch_size=6", "mesh.data=4"], 4, r"not divisible by the batch-parallel size mesh.data\*mesh.fsdp\*mesh.expert=4"),
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
    assert resolve_mesh_shape(cfg.mesh, 8) == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2, "expert": 1}


@pytest.mark.parametrize("override, key, typo, fix", [
    ("model.mixer_pattern=[attention,atention]", "model.mixer_pattern", "atention", "attention"),
    ("model.channel_mixer_pattern=[swiglu,moee]", "model.channel_mixer_pattern", "moee", "moe")])
def test_unknown_mixer_is_refused_at_load_with_did_you_mean(override, key, typo, fix):
    with pytest.raises(ConfigError, match=rf"^{key}: unknown mixer '{typo}' \(did you mean '{fix}'\?\); registered: "):
        load_config(None, [override])


def test_schema_lists_the_registered_mixers():
    from jaxeff.config.reference import json_schema
    from jaxeff.layers.registry import CHANNEL_MIXERS, TOKEN_MIXERS

    props = json_schema()["$defs"]["ModelConfig"]["properties"]
    assert props["mixer_pattern"]["items"]["enum"] == sorted(TOKEN_MIXERS)
    assert props["channel_mixer_pattern"]["items"]["enum"] == sorted(CHANNEL_MIXERS)
    assert {"attention", "lightning", "mlstm", "companion", "s2", "sink_window"} <= set(TOKEN_MIXERS)


@pytest.mark.parametrize("yaml_text, extra, message", [
    ("train:\n  stepss: 3\n", [], "unknown config key 'train.stepss'"),
    ("train:\n  global_batch_size: 6\n", ["mesh.data=4"], "train.global_batch_size=6"),
    ("model: [1, 2\n", [], "is not valid YAML"),
    ("model:\n  lightning_impl: auto\n", [], "'model.lightning_impl' is now 'model.lightning.impl'"),
    ("model:\n  lightning:\n    blocksize: 3\n", [], "unknown config key 'model.lightning.blocksize' (did you mean 'block_size'?)"),
    ("train:\n  steps: ten\n", [], "train.steps: expected int, got 'ten'"),
    ("train:\n  steps: 10\n  warmup_steps: 20\n", [], "train.warmup_steps=20 must be smaller than train.steps=10"),
    ("model:\n  d_model: 96\n  n_heads: 5\n", [], "model.n_heads=5 does not divide model.d_model=96"),
    ("mesh:\n  data: 8\n", [], "but only 4 are present"),
    ("", ["model.lightning.impl.x=1"], "'model.lightning.impl' is a setting, not a section"),
])
def test_cli_reports_user_errors_with_exit_code_2_and_no_traceback(tmp_path, yaml_text, extra, message):
    config = tmp_path / "bad.yaml"
    config.write_text(textwrap.dedent(yaml_text))
    assert_user_error(run_jaxeff("train", "--config", str(config), "--workdir", str(tmp_path / "w"), *extra,
                                 devices=4), message)


def test_cli_missing_config_file_or_a_directory(tmp_path):
    assert_user_error(run_jaxeff("train", "--config", str(tmp_path / "nope.yaml")), "does not exist")
    assert_user_error(run_jaxeff("train", "--config", str(tmp_path)), f"config file '{tmp_path}' is a directory")


# ----------------------------------------------------------------------------- sections, renamed keys, round trip


@pytest.mark.parametrize("override, message", [
    ("model.lightning.block_sise=32", r"unknown config key 'model.lightning.block_sise' \(did you mean 'block_size'\?\); "
                                      r"valid keys here: impl, block_size"),
    ("model.lightnin.impl=chunked", r"unknown config key 'model.lightnin' \(did you mean 'lightning'\?\)"),
    ("model.lightning=3", r"model.lightning: expected a mapping of keys \(a section\), got 3"),
    ("model.lightning.impl=fast", r"model.lightning.impl: expected one of 'auto' \| 'reference' \| 'chunked' \| 'pallas'"),
    ("model.lightning.block_size=0", r"model.lightning.block_size=0: must be positive"),
    ("model.lightning.block_size=16.5", r"model.lightning.block_size: expected int, got 16.5"),
    ("model.lightning.lrpe_layers=[0, x]", r"model.lightning.lrpe_layers\[1\]: expected int, got 'x'"),
    ("model.lightning.impl.x=1", r"'model.lightning.impl' is a setting, not a section"),
    ("train.learning_rate=.nan", r"train.learning_rate: expected a finite number"),
    ("train.b2=1.0", r"train.b2=1.0: must be >= 0 and < 1"),
    ("model.mixer_pattern=[]", r"model.mixer_pattern: needs at least 1 entry"),
    ("model.n_kv_heads=0", r"model.n_kv_heads=0: must be positive"),  # a bound inside `int | None`
])
def test_section_keys_and_values_name_the_dotted_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("old, new", [("model.lightning_impl=chunked", "model.lightning.impl"),
                                      ("model.lightning_block_size=32", "model.lightning.block_size"),
                                      ("model.decay_convention=paper", "model.lightning.decay_convention"),
                                      ("model.lrpe_layers=[1]", "model.lightning.lrpe_layers")])
def test_old_flat_keys_name_the_new_key(old, new):
    with pytest.raises(ConfigError, match=rf"'{old.split('=')[0]}' is now '{new}'"):
        load_config(None, [old])


def test_old_flat_keys_in_yaml_are_all_named_in_one_line(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  mixer_pattern: [lightning]\n  lightning_impl: auto\n  lrpe_layers: [0]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "'model.lightning_impl' is now 'model.lightning.impl'" in str(e.value)
    assert "'model.lrpe_layers' is now 'model.lightning.lrpe_layers'" in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_sections_mean_defaults_and_keys_must_be_names(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\nmodel:\n  lightning:\n")
    assert load_config(path) == load_config(None)
    path.write_text("model:\n  lightning:\n    7: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.lightning.7'"):
        load_config(path)


def test_yaml_floats_without_a_dot_and_nested_sections_parse(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 3e-4\n  eps: 1e-8\nmodel:\n  lightning:\n    block_size: 32\n")
    cfg = load_config(path, ["model.lightning.impl=chunked"])
    assert cfg.train.learning_rate == 3e-4 and isinstance(cfg.train.eps, float) and cfg.train.eps == 1e-8
    assert cfg.model.lightning.block_size == 32 and cfg.model.lightning.impl == "chunked"
    assert cfg.model.lightning.decay_convention == "code"  # untouched keys of a section keep their defaults
    with pytest.raises(ConfigError, match=r"train.steps: expected int, got '3e2'"):
        load_config(None, ["train.steps='3e2'"])  # only float fields read numbers from strings


@pytest.mark.parametrize("name", ["debug.yaml", "tnl-debug.yaml", "tnl-385m.yaml"])
def test_resolved_config_round_trips(tmp_path, name):
    from jaxeff.config import dump_config, read_saved_config

    cfg = load_config(REPO / "configs" / name, ["train.learning_rate=3e-4", "model.lightning.lrpe_layers=[0, 1]"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and read_saved_config(tmp_path / "config.yaml") == cfg
    assert again.model_dump() == cfg.model_dump()


def test_saved_config_is_replaced_whole_and_an_empty_one_is_not_the_defaults(tmp_path):
    """Other processes read config.yaml while process 0 rewrites it (a requeued SLURM job failed on a
    half-written file read as the defaults)."""
    import threading

    from jaxeff.config import dump_config, read_saved_config

    path = tmp_path / "config.yaml"
    cfg = load_config(REPO / "configs" / "debug.yaml")
    dump_config(cfg, path)
    seen, stop = [], threading.Event()

    def read_while_written():
        while not stop.is_set():
            seen.append(read_saved_config(path))

    reader = threading.Thread(target=read_while_written)
    reader.start()
    try:
        for _ in range(200):
            dump_config(cfg, path)
    finally:
        stop.set()
        reader.join()
    assert seen and all(c == cfg for c in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no temporaries left behind
    path.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        read_saved_config(path)


def test_mixer_section_checks_run_only_when_a_layer_uses_the_mixer():
    long_blocks = ["model.lightning.block_size=256", "data.seq_len=128"]
    validate(load_config(None, long_blocks + ["model.mixer_pattern=[attention]"]), 1)
    with pytest.raises(ConfigError, match=r"model.lightning.block_size=256 is longer than data.seq_len=128.*"
                                          r"set model.lightning.block_size to at most 128"):
        validate(load_config(None, long_blocks + ["model.mixer_pattern=[attention, lightning]"]), 1)


def test_saved_configs_with_old_flat_keys_are_migrated(tmp_path):
    from jaxeff.config import read_saved_config
    from jaxeff.config.legacy import migrate_moved_keys

    raw = {"model": {"d_model": 64, "lightning_impl": "chunked", "lightning_block_size": 16,
                     "decay_convention": "paper", "lrpe_layers": [1]}}
    migrated = migrate_moved_keys(raw)
    assert migrated == {"model": {"d_model": 64, "lightning": {"impl": "chunked", "block_size": 16,
                                                               "decay_convention": "paper", "lrpe_layers": [1]}}}
    assert "lightning_impl" in raw["model"]  # the input is left alone
    saved = REPO / "tests/data/legacy_flat_keys/workdir/config.yaml"
    cfg = read_saved_config(saved)
    assert cfg.model.lightning.impl == "chunked" and cfg.model.lightning.block_size == 16


@pytest.mark.parametrize("overrides, message", [
    (["mesh.sequence=8", "data.seq_len=100"], r"data.seq_len=100 is not divisible by mesh.sequence=8"),
    (["mesh.sequence=8", "mesh.data=1", "model.d_model=36", "model.n_heads=3"],
     r"model.d_model=36 is not divisible by mesh.fsdp\*mesh.sequence=8"),
])
def test_sequence_parallel_shapes_are_checked_by_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, overrides), 8)
