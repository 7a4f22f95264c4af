"""Several processes on localhost (jax.distributed over gloo), started by launch/local.py.

Each test is one short multi-process run of the tiny model; together they take a few minutes.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from helpers import REPO, jaxeff_cmd, rewind, subprocess_env, tb_losses, tiny_overrides

pytestmark = pytest.mark.slow
STEPS = 20
OVERRIDES = tiny_overrides(**{"train.steps": STEPS, "checkpoint.every": 10, "train.eval_every": 10,
                              "logging.progress_bar": True})


def launch_cmd(workdir: Path, processes: int, devices: int, *extra: str, failure_timeout: int = 60) -> list[str]:
    return [sys.executable, str(REPO / "launch/local.py"), "--num-processes", str(processes),
            "--devices-per-process", str(devices), "--failure-timeout", str(failure_timeout), "--",
            *jaxeff_cmd(), "train", "--config", "configs/debug.yaml", "--workdir", str(workdir), *OVERRIDES, *extra]


def single_cmd(workdir: Path, *extra: str) -> list[str]:
    return [*jaxeff_cmd(), "train", "--config", "configs/debug.yaml", "--workdir", str(workdir), *OVERRIDES, *extra]


def run(cmd, devices: int = 1, timeout: int = 180) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(devices), timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 20 steps as 1 process x 8 devices and as 2 processes x 4 devices."""
    root = tmp_path_factory.mktemp("mp")
    run(single_cmd(root / "single"), devices=8)
    out = run(launch_cmd(root / "multi", 2, 4))
    assert "[p1] jaxeff: process 1/2 (env): 4 local cpu device(s)" in out
    return root


def test_two_processes_match_one_process(runs):
    single, multi = tb_losses(runs / "single"), tb_losses(runs / "multi")
    assert sorted(multi) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([multi[s] for s in sorted(multi)], [single[s] for s in sorted(multi)], rtol=1e-5)


@pytest.mark.parametrize("devices", [4, 1])
def test_multi_process_checkpoint_continues_on_another_topology(runs, tmp_path, devices):
    workdir = rewind(runs / "multi", tmp_path / "resumed", 10)
    out = run(single_cmd(workdir), devices=devices)
    assert "resumed from checkpoint step 10 (data position rebuilt for this topology)" in out
    resumed, single = tb_losses(workdir), tb_losses(runs / "single")
    assert sorted(resumed) == list(range(11, STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in resumed], [single[s] for s in resumed], rtol=1e-5)


def _start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(1), cwd=REPO)


def _wait_for(proc, marker: str, timeout: float = 120) -> list[str]:
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return seen
        assert time.time() < deadline, "".join(seen)
    raise AssertionError(f"ended before {marker!r}:\n" + "".join(seen))


def _jaxeff_children(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The launched processes, ordered by their JAXEFF_PROCESS_ID (process 0 hosts the coordinator)."""
    children = [p for p in psutil.Process(launcher.pid).children() if "jaxeff" in " ".join(p.cmdline())]
    return sorted(children, key=lambda p: int(p.environ()["JAXEFF_PROCESS_ID"]))


def test_sigterm_on_one_process_checkpoints_all_and_exits_cleanly(tmp_path):
    launcher = _start(launch_cmd(tmp_path, 2, 2, "train.steps=400", "checkpoint.every=1000"))
    _wait_for(launcher, "[p0] step 5/")
    children = _jaxeff_children(launcher)
    assert len(children) == 2
    children[1].send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 143, out
    assert "[launch] stopped by a signal; exit codes [143, 143]" in out
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 5 <= saved[0] < 400, saved  # one coordinated checkpoint, mid-run
    assert (tmp_path / "checkpoints" / str(saved[0]) / "data" / "process_1-of-2.json").exists()


def test_a_killed_process_stops_the_others(tmp_path):
    launcher = _start(launch_cmd(tmp_path, 2, 2, "train.steps=100000", "checkpoint.every=100000",
                                 failure_timeout=10))
    _wait_for(launcher, "[p0] step 5/")
    victim = _jaxeff_children(launcher)[1]
    killed_at = time.time()
    victim.kill()
    out, _ = launcher.communicate(timeout=150)
    elapsed = time.time() - killed_at
    # JAX's coordination service (heartbeat timeout from JAXEFF_FAILURE_TIMEOUT) stops the survivor.
    assert launcher.returncode != 0
    assert "[launch] killing process" not in out, out[-3000:]
    assert elapsed < 10 + 30, elapsed  # the heartbeat timeout, well before the launcher's own kill
    assert "unhealthy" in out or "heartbeat" in out.lower() or "died" in out, out[-3000:]
