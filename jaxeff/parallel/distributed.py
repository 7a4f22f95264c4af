"""Start JAX's multi-controller runtime (`jax.distributed`) from flags or the scheduler's environment.

Sources, first match wins:
1. explicit `--coordinator HOST:PORT --num-processes N --process-id I`;
2. JAXEFF_COORDINATOR / JAXEFF_NUM_PROCESSES / JAXEFF_PROCESS_ID (set by launch/local.py and
   launch/kubernetes/job.yaml; in an indexed Kubernetes Job JOB_COMPLETION_INDEX stands in for
   JAXEFF_PROCESS_ID);
3. JAXEFF_CLUSTER=tpu: a Cloud TPU VM slice (launch/tpu/tpu-vm.sh sets it; the TPU VM runtime exports
   no variable that names the slice, JAX reads the worker list from the metadata server itself);
   JAXEFF_CLUSTER=none: one process, whatever else the environment says;
4. SLURM with more than one task (`srun`): JAX reads SLURM_* itself;
5. a multi-host TPU slice on GKE (TPU_WORKER_HOSTNAMES with several hosts): JAX reads TPU_* itself;
otherwise one process, and `jax.distributed` is not started. A pod of an indexed Job other than
pod 0 (JOB_COMPLETION_INDEX > 0) without any of these is an error: it would train alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax

from jaxeff.errors import ConfigError

log = logging.getLogger("jaxeff")

# JAXEFF_CLUSTER values: "tpu" starts jax.distributed and lets JAX detect the TPU slice; "none" forces one process.
CLUSTERS = ("tpu", "none")


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    source: str  # "flags", "env", "kubernetes", "slurm", "tpu"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def detect(coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None) -> DistributedSpec | None:
    """Which multi-process environment we are in, or None for a single process."""
    flags = (coordinator, num_processes, process_id)
    if any(f is not None for f in flags):
        if not all(f is not None for f in flags):
            raise ConfigError("--coordinator, --num-processes and --process-id must be given together")
        return _checked(DistributedSpec("flags", coordinator, num_processes, process_id))
    env_coordinator = os.environ.get("JAXEFF_COORDINATOR")
    if env_coordinator:
        pid, source = _int_env("JAXEFF_PROCESS_ID"), "env"
        if pid is None and _int_env("JOB_COMPLETION_INDEX") is not None:
            pid, source = _int_env("JOB_COMPLETION_INDEX"), "kubernetes"
        n = _int_env("JAXEFF_NUM_PROCESSES")
        if pid is None or n is None:
            raise ConfigError("JAXEFF_COORDINATOR is set: also set JAXEFF_NUM_PROCESSES and JAXEFF_PROCESS_ID "
                              "(or JOB_COMPLETION_INDEX on Kubernetes)")
        if os.environ.get("JAXEFF_CLUSTER"):
            raise ConfigError("JAXEFF_COORDINATOR and JAXEFF_CLUSTER are both set: unset one of them")
        return _checked(DistributedSpec(source, env_coordinator, n, pid))
    cluster = os.environ.get("JAXEFF_CLUSTER", "")
    if cluster:
        if cluster not in CLUSTERS:
            raise ConfigError(f"JAXEFF_CLUSTER={cluster!r} must be one of {', '.join(CLUSTERS)}")
        return DistributedSpec("tpu") if cluster == "tpu" else None
    if (_int_env("SLURM_NTASKS") or 1) > 1 and os.environ.get("SLURM_JOB_ID"):
        return DistributedSpec("slurm")
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return DistributedSpec("tpu")
    index = _int_env("JOB_COMPLETION_INDEX")
    if index:
        raise ConfigError(f"JOB_COMPLETION_INDEX={index} (pod {index} of an indexed Kubernetes Job) but JAXEFF_COORDINATOR "
                          "is not set: every pod would train alone. Set JAXEFF_COORDINATOR=<job>-0.<service>:55527 and "
                          "JAXEFF_NUM_PROCESSES=<parallelism> (see launch/kubernetes/job.yaml), or JAXEFF_CLUSTER=none "
                          "for independent single-process pods")
    return None


def _checked(spec: DistributedSpec) -> DistributedSpec:
    if spec.num_processes < 1:
        raise ConfigError(f"the number of processes must be >= 1, got {spec.num_processes}")
    if not 0 <= spec.process_id < spec.num_processes:
        raise ConfigError(f"process id {spec.process_id} is outside 0..{spec.num_processes - 1}")
    if ":" not in spec.coordinator:
        raise ConfigError(f"coordinator address {spec.coordinator!r} must be HOST:PORT")
    return spec


def initialize(spec: DistributedSpec | None, failure_timeout_s: int = 100) -> None:
    """Start jax.distributed for `spec` (no-op for None) and log this process's place in the job.

    `failure_timeout_s` is JAX's heartbeat timeout: when a process stops answering for that long,
    the coordination service stops every other process with an error naming the lost task,
    instead of leaving them blocked in a collective.
    """
    if spec is not None and not _already_initialized():
        kwargs = {"heartbeat_timeout_seconds": failure_timeout_s}
        if spec.source in ("flags", "env", "kubernetes"):
            kwargs.update(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                          process_id=spec.process_id)
        jax.distributed.initialize(**kwargs)
    if spec is not None:
        print(f"jaxeff: process {jax.process_index()}/{jax.process_count()} ({spec.source}): "
              f"{jax.local_device_count()} local {jax.local_devices()[0].platform} device(s) "
              f"{[d.id for d in jax.local_devices()]}, {jax.device_count()} global", flush=True)


def _already_initialized() -> bool:
    from jax._src import distributed as _distributed  # the public API has no "is initialized" query

    return _distributed.global_state.client is not None
