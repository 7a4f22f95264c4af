"""A careless user and a hostile disk: damaged checkpoints fall back, Ctrl-C is clean at any moment,
and every bad file, path, flag or workdir is one line with exit code 2. Nothing saved is ever lost."""

import gzip
import hashlib
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import (REPO, assert_user_error, jaxeff_cmd, rewind, run_jaxeff, subprocess_env, tiny_config,
                     tiny_overrides)
from jaxeff.config import ConfigError, DataConfig
from jaxeff.data import load_tokenizer
from jaxeff.data.sources import load_documents
from jaxeff.errors import UserError
from jaxeff.train import train

EXPORT = REPO / "tests/data/legacy_flat_keys/export"  # a small, valid export to generate from


def tree_digest(path: Path) -> dict[str, str]:
    """relative file path -> sha256 of its bytes, for 'byte-identical after' checks."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def cfg(**extra):
    base = {"train.steps": 6, "checkpoint.every": 3, "checkpoint.async_save": False, "mesh.data": 1}
    base.update(extra)
    return tiny_config(**base)


# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 3 and 6."""
    workdir = tmp_path_factory.mktemp("six")
    train(cfg(), workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]
    return workdir


def _truncate_params(step_dir: Path) -> None:
    for f in (step_dir / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:50])


def _truncate_data(step_dir: Path) -> None:
    (f,) = (step_dir / "data").glob("process_*.json")
    f.write_bytes(f.read_bytes()[:7])


def _remove_train_state(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "train_state")


@pytest.mark.parametrize("damage", [_truncate_params, _truncate_data, _remove_train_state])
def test_a_damaged_newest_step_is_set_aside_and_the_previous_one_resumes(six_steps, tmp_path, capfd, damage):
    damaged = rewind(six_steps, tmp_path / "damaged", 6)
    damage(damaged / "checkpoints/6")
    before = {"3": tree_digest(damaged / "checkpoints/3"), "6": tree_digest(damaged / "checkpoints/6")}
    result = train(cfg(**{"train.steps": 9}), damaged)

    err = capfd.readouterr().err
    assert "checkpoint step 6 cannot be restored" in err and "6.damaged-1" in err
    assert tree_digest(damaged / "checkpoints/6.damaged-1") == before["6"]  # kept as it was, only renamed
    assert tree_digest(damaged / "checkpoints/3") == before["3"]
    assert sorted(result.losses) == [4, 5, 6, 7, 8, 9]

    reference = train(cfg(**{"train.steps": 9}), rewind(six_steps, tmp_path / "from3", 3))
    assert [result.losses[s] for s in range(4, 10)] == [reference.losses[s] for s in range(4, 10)]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 result.params, reference.params)


def test_export_skips_a_damaged_step_and_says_which_step_it_exported(six_steps, tmp_path):
    workdir = rewind(six_steps, tmp_path / "w", 6)
    _truncate_params(workdir / "checkpoints/6")
    before = tree_digest(workdir)
    proc = run_jaxeff("export", "--workdir", str(workdir), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint step 6 cannot be restored" in proc.stderr and "exported step 3" in proc.stdout
    assert tree_digest(workdir) == before  # export never changes the training workdir


def test_no_restorable_step_is_a_user_error_naming_the_workdir(six_steps, tmp_path):
    workdir = rewind(six_steps, tmp_path / "w", 6)
    for step in ("3", "6"):
        _truncate_params(workdir / "checkpoints" / step)
    with pytest.raises(UserError, match=rf"no checkpoint in {workdir}/checkpoints can be restored"):
        train(cfg(**{"train.steps": 9}), workdir)
    assert {p.name for p in (workdir / "checkpoints").iterdir()} == {"3.damaged-1", "6.damaged-1"}


def test_without_a_saved_config_the_checkpoint_shapes_are_checked(six_steps, tmp_path, capfd):
    workdir = rewind(six_steps, tmp_path / "w", 6)
    (workdir / "config.yaml").unlink()
    before = tree_digest(workdir / "checkpoints")
    with pytest.raises(UserError, match=r"checkpoint step 6 .* was written by a different model: parameter "
                                        r"'embed/embedding' has shape \(384, 32\) in the checkpoint but \(384, 64\)"):
        train(cfg(**{"train.steps": 9, "model.d_model": 64}), workdir)
    assert "config.yaml is missing" in capfd.readouterr().err
    assert tree_digest(workdir / "checkpoints") == before


def test_a_finished_or_overtaken_run_says_so_without_nan_figures(six_steps, tmp_path, capfd):
    workdir = rewind(six_steps, tmp_path / "w", 6)
    result = train(cfg(), workdir)
    out = capfd.readouterr().out
    assert result.exit_code == 0 and result.final_step == 6 and "already complete at step 6" in out
    assert "nan" not in out and "tok/s" not in out
    with pytest.raises(ConfigError, match=r"is at step 6, past train.steps=4; to train further set train.steps "
                                          r"above 6"):
        train(cfg(**{"train.steps": 4, "train.warmup_steps": 1}), workdir)


# ----------------------------------------------------------------------------- Ctrl-C


def _interrupt_after(workdir: Path, seconds: float, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([*jaxeff_cmd(), "train", "--config", "configs/tnl-debug.yaml", "--workdir", str(workdir),
                             "logging.progress_bar=false", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [0.4, 2.0, 4.0])  # importing, building the corpus, compiling
def test_ctrl_c_during_start_up_exits_130_with_one_line(tmp_path, seconds):
    proc = _interrupt_after(tmp_path / "w", seconds)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])  # not -11 (segfault) or 1
    assert "Traceback" not in proc.stderr + proc.stdout
    # Before the first step: one line, at once. A slow start may let training begin: then it saves first.
    assert "jaxeff: interrupted" in proc.stderr.strip().splitlines()[-1] or "stopped by signal 2" in proc.stdout


@pytest.mark.slow
def test_ctrl_c_while_resuming_leaves_the_checkpoints_byte_identical(six_steps, tmp_path):
    workdir = rewind(six_steps, tmp_path / "w", 6)
    before = tree_digest(workdir / "checkpoints")
    overrides = tiny_overrides(**{"train.steps": 9, "checkpoint.every": 3, "checkpoint.async_save": False,
                                  "mesh.data": 1})
    proc = subprocess.Popen([*jaxeff_cmd(), "train", "--config", "configs/debug.yaml", "--workdir", str(workdir),
                             *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=REPO)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    after = tree_digest(workdir / "checkpoints")
    assert {k: v for k, v in after.items() if k.split("/")[0] in ("3", "6")} == before


# ----------------------------------------------------------------------------- data files


@pytest.mark.parametrize("name, content, message", [
    ("a.txt.gz", gzip.compress(b"print('hi')\n" * 50), "is not UTF-8 text: invalid byte at offset 1 (gzip-compressed"),
    ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1") * 10, "is not UTF-8 text"),
    ("nul.txt", b"abc\x00def\n" * 10, "contains NUL bytes"),
], ids=["gzip", "latin1", "nul"])
def test_binary_or_non_utf8_text_files_are_refused_by_name(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    (tmp_path / "ok.txt").write_text("fine text\n" * 20)
    with pytest.raises(ConfigError, match=re.escape(f"data.paths: '{tmp_path / name}' {message}")):
        load_documents(DataConfig(source="text", paths=[str(tmp_path / "ok.txt"), str(tmp_path / name)]))


def test_a_jsonl_line_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=rf"'{path}' line 2 is not UTF-8 text"):
        load_documents(DataConfig(source="jsonl", paths=[str(path)]))


def test_a_file_that_is_not_an_arrayrecord_is_named(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("not an array record\n" * 5000)
    with pytest.raises(ConfigError, match=rf"'{path}' is not a readable ArrayRecord file"):
        load_documents(DataConfig(source="arrayrecord", paths=[str(path)]))


def test_directories_are_called_directories(tmp_path):
    with pytest.raises(ConfigError, match=rf"data.paths: '{tmp_path}' is a directory; give files or a glob"):
        load_documents(DataConfig(source="text", paths=[str(tmp_path)]))
    with pytest.raises(ConfigError, match=rf"data.tokenizer: '{tmp_path}' is a directory"):
        load_tokenizer(str(tmp_path))


def test_data_errors_reach_the_cli_as_one_line(tmp_path):
    (tmp_path / "a.gz").write_bytes(gzip.compress(b"x" * 100))
    proc = run_jaxeff("train", "--config", "configs/debug.yaml", "--workdir", str(tmp_path / "w"),
                      "data.source=text", f"data.paths=[{tmp_path / 'a.gz'}]")
    assert_user_error(proc, f"'{tmp_path / 'a.gz'}' is not UTF-8 text")


# ----------------------------------------------------------------------------- paths and flags


def test_unusable_workdirs_and_export_targets_are_one_line(six_steps, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    train_args = ["train", "--config", "configs/debug.yaml"]
    assert_user_error(run_jaxeff(*train_args, "--workdir", str(a_file)), f"--workdir {a_file} is a file")
    assert_user_error(run_jaxeff(*train_args, "--workdir", str(a_file / "sub")), f"--workdir {a_file / 'sub'} cannot be written")
    assert_user_error(run_jaxeff("export", "--workdir", str(six_steps), "--out", str(a_file)), f"--out {a_file} is a file")
    assert_user_error(run_jaxeff("export", "--workdir", str(six_steps), "--out", str(a_file / "sub")),
                      f"--out {a_file / 'sub'} cannot be written")


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["--temperature", "nan"], "--temperature nan: must be >= 0"),
    (["--top-k", "-3"], "--top-k -3: must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
])
def test_generate_refuses_bad_flags(flags, message):
    assert_user_error(run_jaxeff("generate", "--workdir", str(EXPORT), "--prompt", "def ", *flags), message)


def test_generate_prompt_that_is_not_utf8_and_top_k_beyond_the_vocabulary(tmp_path):
    proc = subprocess.run([*jaxeff_cmd(), "generate", "--workdir", str(EXPORT), "--prompt", b"caf\xe9",
                           "--max-new-tokens", "2"], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert_user_error(proc, "--prompt is not valid UTF-8")
    proc = run_jaxeff("generate", "--workdir", str(EXPORT), "--prompt", "def ", "--top-k", "100000",
                      "--max-new-tokens", "3", "--seed", "1")
    assert proc.returncode == 0 and proc.stdout.startswith("def "), proc.stderr[-2000:]
