"""The launch templates: the Kubernetes manifests validate against the official schema and give every pod the
environment jaxeff's process detection needs; the shell launchers parse, and the TPU VM script's dry run
prints the commands it would run. Fast, offline: the schemas come from the kubernetes-validate package."""

import copy
import os
import pathlib
import shlex
import subprocess

import kubernetes_validate
import pytest
import yaml

from jaxeff.cli import _parser
from jaxeff.parallel.distributed import DistributedSpec, detect

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
REPO = LAUNCH.parent
MANIFESTS = sorted((LAUNCH / "kubernetes").glob("*.yaml"))
JOB_YAML = LAUNCH / "kubernetes" / "job.yaml"
TPU_VM = LAUNCH / "tpu" / "tpu-vm.sh"
# The oldest Kubernetes the Job is written for (podFailurePolicy is GA from 1.31) and the newest schema bundled.
K8S_VERSIONS = ("1.31", kubernetes_validate.latest_version())
# What detect() reads; cleared so that the machine running the tests cannot leak into them.
DETECTED_VARS = ("JAXEFF_COORDINATOR", "JAXEFF_NUM_PROCESSES", "JAXEFF_PROCESS_ID", "JOB_COMPLETION_INDEX",
                 "JAXEFF_CLUSTER", "SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES")


def documents(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def job_and_service():
    docs = {d["kind"]: d for d in documents(JOB_YAML)}
    assert set(docs) == {"Job", "Service"}, "job.yaml holds one Job and its headless Service"
    return docs["Job"], docs["Service"]


def container_env(job):
    [container] = job["spec"]["template"]["spec"]["containers"]
    env = {}
    for var in container.get("env", []):
        assert "value" in var, f"{var['name']}: detect() needs a literal value"
        env[var["name"]] = var["value"]
    return env


# --- Kubernetes: schema ---

def test_the_manifests_are_found():
    assert JOB_YAML in MANIFESTS and len(MANIFESTS) >= 2


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_document_validates_against_the_official_schema(path, version):
    docs = documents(path)
    assert docs
    for doc in docs:
        # strict: the schema variant that rejects unknown fields, as `kubectl apply --validate=strict` does
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("mutate, field", [
    (lambda job: job["spec"]["template"]["spec"].__setitem__(
        "terminationGracePeriodSecond", job["spec"]["template"]["spec"].pop("terminationGracePeriodSeconds")),
     "terminationGracePeriodSecond"),
    (lambda job: job["spec"].__setitem__("completionMod", job["spec"].pop("completionMode")), "completionMod"),
    (lambda job: job["spec"]["template"]["spec"]["containers"][0]["env"][0].__setitem__(
        "valeu", job["spec"]["template"]["spec"]["containers"][0]["env"][0].pop("value")), "valeu"),
    (lambda job: job["spec"].__setitem__("parallelism", "two"), "parallelism"),
], ids=["pod-field", "job-field", "env-field", "wrong-type"])
def test_a_typo_in_a_copy_fails_validation(mutate, field):
    job, _ = job_and_service()
    bad = copy.deepcopy(job)
    mutate(bad)
    with pytest.raises(kubernetes_validate.ValidationError) as e:
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)
    assert field in str(e.value.message) or field in map(str, e.value.path)


# --- Kubernetes: what the pods see ---

def test_the_job_is_indexed_and_every_process_runs_at_once():
    job, _ = job_and_service()
    spec = job["spec"]
    n = int(container_env(job)["JAXEFF_NUM_PROCESSES"])
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == n


def test_pod_dns_names_resolve_through_the_headless_service():
    job, service = job_and_service()
    pod = job["spec"]["template"]["spec"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True  # names resolve before the pods are ready
    assert pod["subdomain"] == service["metadata"]["name"]
    # The Job controller labels its pods job-name=<Job name>; the Service must select exactly these.
    pod_labels = {**job["spec"]["template"]["metadata"].get("labels", {}), "job-name": job["metadata"]["name"],
                  "batch.kubernetes.io/job-name": job["metadata"]["name"]}
    selector = service["spec"]["selector"]
    assert selector and all(pod_labels.get(k) == v for k, v in selector.items())


def test_the_coordinator_is_pod_0_where_jax_would_look_for_it():
    from jax._src.clusters.k8s_cluster import K8sCluster

    job, _ = job_and_service()
    host, port = container_env(job)["JAXEFF_COORDINATOR"].rsplit(":", 1)
    # An indexed Job's pod i has hostname <Job name>-<i>; JAX's Kubernetes detection derives the same address.
    assert host == f"{job['metadata']['name']}-0.{job['spec']['template']['spec']['subdomain']}"
    assert port == K8sCluster._coordinator_port
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert int(port) in [p["containerPort"] for p in container["ports"]]


def test_every_pod_gets_its_own_process_id(monkeypatch):
    job, _ = job_and_service()
    env = container_env(job)
    n = job["spec"]["parallelism"]
    coordinator = env["JAXEFF_COORDINATOR"]
    for name in DETECTED_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for i in range(n):  # what the Job controller adds to pod i
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(i))
        monkeypatch.setenv("HOSTNAME", f"{job['metadata']['name']}-{i}")
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
        assert detect() == DistributedSpec("kubernetes", coordinator, n, i)


def test_the_command_is_jaxeff_train_with_a_shared_workdir():
    job, _ = job_and_service()
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    command = container["command"]
    assert command[:2] == ["jaxeff", "train"]  # exec form: jaxeff itself is PID 1 and gets the SIGTERM
    args = _parser().parse_args(command[1:])
    assert (REPO / args.config).is_file()
    # The workdir lies on a volume that every pod mounts: a ReadWriteMany claim from workdir-pvc.yaml.
    [mount] = [m for m in container["volumeMounts"] if args.workdir.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claims = {d["metadata"]["name"]: d for p in MANIFESTS for d in documents(p) if d["kind"] == "PersistentVolumeClaim"}
    claim = claims[volume["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "gs://" in JOB_YAML.read_text()  # the bucket workdir option is documented next to it


def test_failures_restart_the_pods_and_preemption_has_time_to_save():
    job, _ = job_and_service()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert spec["backoffLimit"] >= 2 * spec["parallelism"]  # a lost pod fails every pod: allow restarts
    assert spec["podReplacementPolicy"] == "Failed"  # no new pod i while the old one is still saving
    assert pod["terminationGracePeriodSeconds"] >= 120
    rules = spec["podFailurePolicy"]["rules"]
    action = {}
    for rule in rules:
        for condition in rule.get("onPodConditions", []):
            action[condition["type"]] = rule["action"]
        for code in rule.get("onExitCodes", {}).get("values", []):
            assert rule["onExitCodes"]["operator"] == "In"
            action[code] = rule["action"]
    assert action == {"DisruptionTarget": "Ignore", 143: "Ignore", 2: "FailJob"}
    assert "one training step plus one checkpoint save" in JOB_YAML.read_text()


# --- shell launchers ---

SHELL_SCRIPTS = sorted(p for pattern in ("*.sh", "*.sbatch") for p in LAUNCH.rglob(pattern))


def test_the_shell_launchers_are_found():
    names = {p.relative_to(LAUNCH).as_posix() for p in SHELL_SCRIPTS}
    assert "tpu/tpu-vm.sh" in names and any(n.endswith(".sbatch") for n in names)


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(LAUNCH).as_posix())
def test_bash_parses_every_launcher(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def run_tpu_vm(*args, env=None):
    return subprocess.run(["bash", str(TPU_VM), *args], capture_output=True, text=True, cwd=REPO, timeout=30,
                          env={**os.environ, "DRY_RUN": "0", **(env or {})})


OVERRIDES = ("train.steps=10", "optimizer.lr=3e-4", "data.name=two words")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_tpu_vm_dry_run_prints_the_commands(how):
    args = ("my-v5p-16", "us-east5-a", "configs/debug.yaml", "gs://my-bucket/runs/r1", *OVERRIDES)
    result = run_tpu_vm("--dry-run", *args) if how == "flag" else run_tpu_vm(*args, env={"DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    gcloud = [words for words in lines if words[0] == "gcloud"]
    assert [w[:5] for w in gcloud] == [["gcloud", "compute", "tpus", "tpu-vm", "scp"]] * 2 + [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert all("--worker=all" in w and "--zone=us-east5-a" in w for w in gcloud)
    assert ["configs/debug.yaml", "my-v5p-16:jaxeff-config.yaml"] == gcloud[1][5:7]
    ssh = gcloud[-1]
    assert ssh[5] == "my-v5p-16"
    on_host = ssh[ssh.index("--command") + 1]
    check = subprocess.run(["bash", "-n", "-c", on_host], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "tar -xzf ~/jaxeff-src.tar.gz" in on_host and 'pip install -q -e ~/jaxeff-launch/src"[tpu]"' in on_host
    remote = shlex.split(on_host.rsplit("; ", 1)[-1])  # the last command on the host
    assert remote[0] == "JAXEFF_CLUSTER=tpu" and remote[2].endswith("jaxeff")
    assert remote[3:] == ["train", "--config", "~/jaxeff-config.yaml", "--workdir", "gs://my-bucket/runs/r1",
                          *OVERRIDES]


def test_tpu_vm_without_install_runs_the_printed_commands(tmp_path):
    """Not a dry run: a stand-in gcloud copies into a fake home and runs the remote command with bash, and a
    stand-in jaxeff records its arguments: the quoting survives the trip."""
    home, bin_ = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_.mkdir()
    (bin_ / "gcloud").write_text(
        '#!/usr/bin/env bash\n'
        'echo "gcloud $*" >> "$HOME/gcloud.log"\n'
        'shift 3\n'
        'case "$1" in\n'
        '  scp) cp "$2" "$HOME/${3#*:}" ;;\n'
        '  ssh) while [ $# -gt 0 ]; do [ "$1" = --command ] && exec bash -c "$2"; shift; done ;;\n'
        'esac\n')
    (bin_ / "jaxeff").write_text('#!/usr/bin/env bash\necho "JAXEFF_CLUSTER=$JAXEFF_CLUSTER"\n'
                                 'printf "%s\\n" "$@"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    result = run_tpu_vm("--no-install", "t", "z", "configs/debug.yaml", "/mnt/shared/r", *OVERRIDES,
                        env={"HOME": str(home), "PATH": f"{bin_}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["JAXEFF_CLUSTER=tpu", "train", "--config", f"{home}/jaxeff-config.yaml",
                                          "--workdir", "/mnt/shared/r", *OVERRIDES]
    assert (home / "jaxeff-config.yaml").read_text() == (REPO / "configs/debug.yaml").read_text()
    assert "+ gcloud compute tpus tpu-vm ssh t" in result.stderr  # each command is echoed as it runs


@pytest.mark.parametrize("args, message", [
    ((), "usage: launch/tpu/tpu-vm.sh"),
    (("my-tpu", "us-east5-a", "configs/debug.yaml"), "usage: launch/tpu/tpu-vm.sh"),
    (("--bogus", "t", "z", "configs/debug.yaml", "gs://b/r"), "unknown option --bogus"),
    (("t", "z", "configs/nope.yaml", "gs://b/r"), "no such file"),
    (("t", "z", "configs/debug.yaml", "runs/r"), "must be gs://BUCKET/PATH or an absolute path"),
    (("t", "z", "configs/debug.yaml", "gs://b/r", "train.steps"), "is not key.sub=value"),
])
def test_tpu_vm_refuses_bad_arguments(args, message):
    result = run_tpu_vm("--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
