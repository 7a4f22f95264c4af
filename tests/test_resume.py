"""End to end through the CLI: SIGTERM and resume, kill -9 during a save, export read by plain orbax."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import jaxeff_cmd, subprocess_env, tiny_overrides
from jaxeff.infer import load_inference_model

STEPS = 400  # long enough that a signal sent at step 20 or 30 always lands mid-run
OVERRIDES = tiny_overrides(**{"train.steps": STEPS, "checkpoint.every": 40, "train.eval_every": 50,
                              "logging.progress_bar": True,
                              "sample.max_new_tokens": 8})
DEVICES = 2  # a sharded (data=2) checkpoint, so restore goes through real shardings


def train_cmd(workdir: Path, *extra: str) -> list[str]:
    return [*jaxeff_cmd(), "train", "--config", "configs/debug.yaml", "--workdir", str(workdir), *OVERRIDES, *extra]


def run(cmd, timeout=240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(DEVICES), timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def start(cmd) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(DEVICES), cwd=Path(__file__).resolve().parents[1])


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 180) -> list[str]:
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return seen
        assert time.time() < deadline, "".join(seen)
    raise AssertionError("process ended before printing " + prefix + "\n" + "".join(seen))


def assert_params_bitwise_equal(a_dir: Path, b_dir: Path) -> None:
    a, b = load_inference_model(a_dir), load_inference_model(b_dir)
    assert a.step == b.step == STEPS
    flat_a, flat_b = jax.tree.leaves_with_path(a.params), jax.tree.leaves(b.params)
    for (path, x), y in zip(flat_a, flat_b):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{jax.tree_util.keystr(path)} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    proc = run(train_cmd(workdir))
    assert "--- sample" in proc.stdout and f"jaxeff: done, step {STEPS}" in proc.stdout
    return workdir


@pytest.mark.slow
def test_sigterm_saves_then_resume_is_bitwise_exact(uninterrupted, tmp_path):
    proc = start(train_cmd(tmp_path))
    wait_for_line(proc, "step 20/")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by signal 15" in out
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and 20 <= saved[-1] < STEPS, saved  # the signal's own checkpoint, mid-run
    resumed = run(train_cmd(tmp_path))
    assert f"resumed from checkpoint step {saved[-1]}" in resumed.stdout
    assert_params_bitwise_equal(uninterrupted, tmp_path)


@pytest.mark.slow
def test_kill_9_during_async_saves_then_resume(uninterrupted, tmp_path):
    proc = start(train_cmd(tmp_path, "checkpoint.every=5"))
    wait_for_line(proc, "step 30/")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    ckpts = tmp_path / "checkpoints"
    # Whatever the kill interrupted, also plant a half-written step as a crash would leave it.
    partial = ckpts / f"{STEPS - 1}.orbax-checkpoint-tmp-1234"
    (partial / "params").mkdir(parents=True)
    complete = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()]
    resumed = run(train_cmd(tmp_path, "checkpoint.every=5"))
    assert not partial.exists()
    assert f"resumed from checkpoint step {max(complete)}" in resumed.stdout or max(complete) == 0
    assert_params_bitwise_equal(uninterrupted, tmp_path)


@pytest.mark.slow
def test_export_restores_with_plain_orbax_and_generates(uninterrupted, tmp_path):
    out = tmp_path / "export"
    run([*jaxeff_cmd(), "export", "--workdir", str(uninterrupted), "--out", str(out)])
    reader = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import orbax.checkpoint as ocp
        params = ocp.StandardCheckpointer().restore({str(out / 'params')!r})
        meta = json.load(open({str(out / 'config.json')!r}))
        assert "jaxeff" not in sys.modules, "the reader must not need jaxeff"
        flat = {{}}
        def walk(prefix, node):
            for k, v in node.items():
                walk(prefix + k + "/", v) if isinstance(v, dict) else flat.__setitem__(prefix + k, np.asarray(v))
        walk("", params)
        np.savez({str(tmp_path / 'plain.npz')!r}, **flat)
        print(meta["task"], meta["model"]["d_model"], meta["meta"]["vocab_size"], meta["step"])
    """)
    env = subprocess_env(1)
    env.pop("PYTHONPATH")
    proc = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["lm", "32", "259", str(STEPS)]
    plain = np.load(tmp_path / "plain.npz")
    trained = load_inference_model(uninterrupted).params
    for path, value in jax.tree.leaves_with_path(trained):
        key = "/".join(p.key for p in path)
        assert np.array_equal(plain[key], np.asarray(value)), key
    assert len(plain.files) == len(jax.tree.leaves(trained))

    gen = [*jaxeff_cmd(), "generate", "--prompt", "import ", "--max-new-tokens", "20", "--seed", "3"]
    from_export = run([*gen, "--workdir", str(out)]).stdout
    from_workdir = run([*gen, "--workdir", str(uninterrupted)]).stdout
    assert from_export == from_workdir and from_export.startswith("import ")
    assert len(from_export) > len("import ") + 5


@pytest.mark.slow
def test_debug_mode_runs_eagerly_on_one_device(tmp_path):
    proc = run([*jaxeff_cmd(), "train", "--config", "configs/debug.yaml", "--workdir", str(tmp_path), "--debug",
                *tiny_overrides(**{"train.steps": 2, "train.warmup_steps": 1, "train.jit": False})])
    assert "mesh: 1 device, jax_debug_nans on" in proc.stdout
    assert "on 1 cpu device(s)" in proc.stdout and "jaxeff: done, step 2" in proc.stdout




# The periodic save of step 20 is made slow (4 s in Orbax's finalize, where the step becomes complete), so that both
# Ctrl-Cs land while it is still being written, as they would with a large model.
SLOW_SAVE = textwrap.dedent("""
    import sys, time
    import orbax.checkpoint as ocp
    finalize = ocp.CheckpointManager._finalize_checkpoint
    def slow_finalize(self, step):
        if step == 20:
            print("test: the save of step 20 is being written", flush=True)
            time.sleep(4)
        return finalize(self, step)
    ocp.CheckpointManager._finalize_checkpoint = slow_finalize
    from jaxeff.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_ctrl_c_twice_never_costs_the_checkpoint_being_written(tmp_path):
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE)
    workdir = tmp_path / "run"
    proc = start([sys.executable, str(script), *train_cmd(workdir, "checkpoint.every=20")[3:]])
    # Printed from Orbax's thread, it may land in the middle of a progress line: look for it anywhere.
    seen, deadline = [], time.time() + 180
    for line in proc.stdout:
        seen.append(line)
        if "test: the save of step 20 is being written" in line:
            break
        assert time.time() < deadline, "".join(seen)
    else:
        raise AssertionError("ended before the slow save began:\n" + "".join(seen))
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "jaxeff: Ctrl-C again: finishing checkpoint step" in out, out[-3000:]
    # Whoever ends the process says the checkpoints are complete: the watcher thread once the save in flight is
    # written, or the main thread when the second Ctrl-C came while it was inside the save (it then finishes it).
    last = out.strip().splitlines()[-2:]
    assert any("is complete; stopped" in line or "checkpoint saved in" in line for line in last), out[-3000:]
    assert time.time() - sent < 60
    # The first Ctrl-C may already have started its own save (waiting behind step 20's): then both are kept.
    names = sorted((p.name for p in (workdir / "checkpoints").iterdir()), key=lambda n: (len(n), n))
    assert names[0] == "20" and all(n.isdigit() for n in names), names  # nothing left half-written
    assert load_inference_model(workdir).step == int(names[-1])  # the newest one restores
