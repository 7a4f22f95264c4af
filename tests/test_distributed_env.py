"""Which multi-process environment `jaxeff train` detects, from flags and scheduler variables."""

import pytest

from jaxeff.config import ConfigError
from jaxeff.parallel.distributed import DistributedSpec, detect

SCHEDULER_VARS = ("JAXEFF_COORDINATOR", "JAXEFF_NUM_PROCESSES", "JAXEFF_PROCESS_ID", "JOB_COMPLETION_INDEX",
                  "JAXEFF_CLUSTER", "SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in SCHEDULER_VARS:
        monkeypatch.delenv(name, raising=False)


def test_single_process_by_default():
    assert detect() is None


def test_flags_win_over_environment(monkeypatch):
    monkeypatch.setenv("JAXEFF_COORDINATOR", "10.0.0.1:1")
    assert detect("host:1234", 4, 3) == DistributedSpec("flags", "host:1234", 4, 3)


def test_jaxeff_environment(monkeypatch):
    monkeypatch.setenv("JAXEFF_COORDINATOR", "127.0.0.1:5000")
    monkeypatch.setenv("JAXEFF_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXEFF_PROCESS_ID", "1")
    assert detect() == DistributedSpec("env", "127.0.0.1:5000", 2, 1)


def test_kubernetes_indexed_job(monkeypatch):
    monkeypatch.setenv("JAXEFF_COORDINATOR", "jaxeff-workers-0-0.jaxeff:1234")
    monkeypatch.setenv("JAXEFF_NUM_PROCESSES", "4")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    assert detect() == DistributedSpec("kubernetes", "jaxeff-workers-0-0.jaxeff:1234", 4, 3)


def test_slurm_and_tpu_are_left_to_jax(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert detect() is None  # a one-task allocation is a single process
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert detect() == DistributedSpec("slurm")
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1,t2")
    assert detect() == DistributedSpec("tpu")


def test_jaxeff_cluster_names_a_tpu_vm_slice_or_one_process(monkeypatch):
    monkeypatch.setenv("JAXEFF_CLUSTER", "tpu")  # launch/tpu/tpu-vm.sh: JAX reads the slice from the TPU metadata
    assert detect() == DistributedSpec("tpu")
    monkeypatch.setenv("JAXEFF_CLUSTER", "none")  # wins over SLURM and TPU variables
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1,t2")
    assert detect() is None


def test_gke_tpu_pod_of_an_indexed_job_is_left_to_jax(monkeypatch):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w-0.svc,w-1.svc")
    assert detect() == DistributedSpec("tpu")


def test_indexed_job_pod_without_coordinator_is_an_error(monkeypatch):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    assert detect() is None  # pod 0 of a one-pod Job: a single process
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    with pytest.raises(ConfigError, match=r"JOB_COMPLETION_INDEX=2 .* JAXEFF_COORDINATOR is not set"):
        detect()
    monkeypatch.setenv("JAXEFF_CLUSTER", "none")  # independent single-process pods (e.g. a sweep)
    assert detect() is None


@pytest.mark.parametrize("args, env, message", [
    (("host:1", 2, None), {}, "must be given together"),
    (("host:1", 2, 2), {}, r"process id 2 is outside 0..1"),
    (("hostonly", 2, 0), {}, "must be HOST:PORT"),
    ((None, None, None), {"JAXEFF_COORDINATOR": "h:1"}, "also set JAXEFF_NUM_PROCESSES"),
    ((None, None, None), {"JAXEFF_COORDINATOR": "h:1", "JAXEFF_NUM_PROCESSES": "two", "JAXEFF_PROCESS_ID": "0"},
     "JAXEFF_NUM_PROCESSES='two' must be an integer"),
    ((None, None, None), {"JAXEFF_CLUSTER": "gke"}, r"JAXEFF_CLUSTER='gke' must be one of tpu, none"),
    ((None, None, None), {"JAXEFF_COORDINATOR": "h:1", "JAXEFF_NUM_PROCESSES": "2", "JAXEFF_PROCESS_ID": "0",
                          "JAXEFF_CLUSTER": "tpu"}, "both set"),
])
def test_bad_settings_are_config_errors(monkeypatch, args, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message):
        detect(*args)
