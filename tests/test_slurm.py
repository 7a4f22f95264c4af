"""launch/slurm/jaxeff.sbatch on a real (one-node) SLURM cluster started by launch/slurm/local-cluster.sh.

The template is submitted with sbatch as a user would (2 tasks x 4 simulated CPU devices) and checked for the
properties tests/test_multiprocess.py checks with launch/local.py: the same losses as one process with 8
devices; a requeue mid-run checkpoints, goes back to the queue and resumes bitwise; a task killed with SIGKILL
fails the job fast. Needs root and the Debian packages slurm-wlm and munge (`make test` installs them as root).
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from helpers import REPO, jaxeff_cmd, subprocess_env, tb_losses, tiny_overrides

pytestmark = pytest.mark.slow
STEPS = 20
OVERRIDES = tiny_overrides(**{"train.steps": STEPS, "checkpoint.every": 10, "train.eval_every": 10,
                              "logging.progress_bar": True})
CLUSTER = REPO / "launch/slurm/local-cluster.sh"
TEMPLATE = "launch/slurm/jaxeff.sbatch"
FAILURE_TIMEOUT = 10
SBIN = os.pathsep.join(["/usr/sbin", "/sbin"])


def _missing_tools() -> list[str]:
    path = os.environ.get("PATH", "") + os.pathsep + SBIN
    return [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if not shutil.which(t, path=path)]


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (slurmctld, slurmd), away from the ephemeral range."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = 20000 + s.getsockname()[1] % 10000
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running local cluster; yields the environment for sbatch/scontrol (and the jobs: 4 CPU devices each)."""
    missing = _missing_tools()
    why = None
    if missing:
        why = f"{', '.join(missing)} not installed: apt-get install slurm-wlm munge (as root; `make test` does it)"
    elif os.geteuid() != 0:
        why = "the local SLURM cluster (launch/slurm/local-cluster.sh) needs root"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {why}")
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm")
    env = subprocess_env(4)
    env.update(JAXEFF_SLURM_DIR=str(root / "cluster"), JAXEFF_SLURM_PORT=str(_free_port_pair()),
               SLURM_CONF=str(root / "cluster" / "slurm.conf"), PATH=env.get("PATH", "") + os.pathsep + SBIN,
               JAXEFF=str(Path(jaxeff_cmd()[0]).parent / "jaxeff"), JAXEFF_FAILURE_TIMEOUT=str(FAILURE_TIMEOUT),
               PYTHONUNBUFFERED="1")
    started = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, env=env, timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"export SLURM_CONF={env['SLURM_CONF']}" in started.stdout, started.stdout
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, env=env, timeout=120)


def submit(env: dict, workdir: Path, *overrides: str) -> tuple[str, Path]:
    """sbatch the template as the README says: 1 node x 2 tasks; returns (job id, output file)."""
    out = workdir.parent / f"{workdir.name}.out"
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                           "--time=10", f"--output={out}", TEMPLATE, "configs/debug.yaml", str(workdir),
                           *OVERRIDES, *overrides], capture_output=True, text=True, env=env, cwd=REPO, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0], out


def job(env: dict, job_id: str) -> dict[str, str]:
    """`scontrol show job` as key -> value (JobState, Restarts, ExitCode, ...)."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=env,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def wait_until_done(env: dict, job_id: str, out: Path, timeout: float, restarts: int = 0) -> dict[str, str]:
    """Poll until the job has ended (after `restarts` requeues); cancel it and fail after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job(env, job_id)
        if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") \
                and int(info.get("Restarts", 0)) >= restarts:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout}s:\n{_log(out)}")


def wait_for_output(env: dict, job_id: str, out: Path, marker: str, timeout: float = 150) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if out.exists() and marker in out.read_text(errors="replace"):
            return
        assert job(env, job_id)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), _log(out)
        time.sleep(0.2)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    raise AssertionError(f"no {marker!r} within {timeout}s:\n{_log(out)}")


def _text(out: Path) -> str:
    """The job's output file (both tasks and the batch script; progress-bar updates on lines of their own)."""
    return out.read_text(errors="replace").replace("\r", "\n") if out.exists() else "(no output file)"


def _log(out: Path) -> str:
    return _text(out)[-4000:]


def eval_losses(workdir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(workdir / "tb"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("eval_loss")}


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The same 20 steps uninterrupted: as a SLURM job (2 tasks x 4 devices) and as 1 process x 8 devices."""
    root = tmp_path_factory.mktemp("slurm-reference")
    job_id, out = submit(cluster, root / "slurm")
    single = subprocess.run([*jaxeff_cmd(), "train", "--config", "configs/debug.yaml", "--workdir",
                             str(root / "single"), *OVERRIDES], capture_output=True, text=True,
                            env=subprocess_env(8), cwd=REPO, timeout=300)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    info = wait_until_done(cluster, job_id, out, timeout=300)
    return root, info, out


def test_slurm_job_matches_one_process(reference):
    root, info, out = reference
    log = _text(out)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert "jaxeff: process 1/2 (slurm): 4 local cpu device(s)" in log
    assert "jaxeff: process 0/2 (slurm): 4 local cpu device(s)" in log
    slurm, single = tb_losses(root / "slurm"), tb_losses(root / "single")
    assert sorted(slurm) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([slurm[s] for s in sorted(slurm)], [single[s] for s in sorted(slurm)], rtol=1e-5)


def test_requeue_mid_run_checkpoints_and_resumes_exactly(cluster, reference, tmp_path):
    job_id, out = submit(cluster, tmp_path / "requeued")
    wait_for_output(cluster, job_id, out, "step 3/")
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, env=cluster, timeout=30)
    assert proc.returncode == 0, proc.stderr
    info = wait_until_done(cluster, job_id, out, timeout=240, restarts=1)
    log = _text(out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    stopped = re.search(r"jaxeff: stopped by signal 15 at step (\d+); checkpoint saved", log)
    assert stopped and int(stopped.group(1)) < STEPS, log
    assert f"resumed from checkpoint step {stopped.group(1)}" in log, log
    assert "tasks ended with exit code 143" in log and "restart 1" in log, log
    # Bitwise: every step's training loss and the final evaluation (of the final parameters).
    requeued, uninterrupted = tb_losses(tmp_path / "requeued"), tb_losses(reference[0] / "slurm")
    assert requeued == uninterrupted
    assert eval_losses(tmp_path / "requeued")[STEPS] == eval_losses(reference[0] / "slurm")[STEPS]


def _task(job_id: str, rank: int) -> psutil.Process:
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "train" in (p.info["cmdline"] or []) and p.environ().get("SLURM_JOB_ID") == job_id \
                    and p.environ().get("SLURM_PROCID") == str(rank) and "SLURM_STEP_ID" in p.environ():
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no task {rank} of job {job_id}")


def test_a_killed_task_fails_the_job_fast(cluster, tmp_path):
    job_id, out = submit(cluster, tmp_path / "killed", "train.steps=100000", "checkpoint.every=100000")
    wait_for_output(cluster, job_id, out, "step 3/")
    victim = _task(job_id, 1)
    killed_at = time.time()
    victim.send_signal(signal.SIGKILL)
    info = wait_until_done(cluster, job_id, out, timeout=FAILURE_TIMEOUT + 30)
    elapsed = time.time() - killed_at
    log = _log(out)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, log)
    assert elapsed < FAILURE_TIMEOUT + 30, elapsed
    assert re.search(r"task 1: Killed", log), log
