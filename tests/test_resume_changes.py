"""Resuming with other settings: a smaller mesh, other kernels or cadences continue the same run;
settings that fix shapes, data order or seeds are refused; workdirs and exports written before the
per-mixer config sections still resume and load."""

import shutil
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import REPO, jaxeff_cmd, rewind, subprocess_env, tb_losses, tiny_overrides
from jaxeff.config import ConfigError, load_config
from jaxeff.config.resume import check_resume
from jaxeff.infer import export_checkpoint, load_inference_model
from jaxeff.train import train

LEGACY = REPO / "tests/data/legacy_flat_keys"


@pytest.mark.parametrize("change", ["mesh.data=1", "mesh.tensor=2", "train.microbatches=2", "model.remat=full",
                                    "model.compute_dtype=bfloat16", "model.lightning.impl=pallas",
                                    "model.lightning.block_size=16", "train.steps=50", "train.eval_every=7",
                                    "checkpoint.every=5", "logging.every=1", "sample.prompt=x",
                                    "data.num_workers=2", "train.learning_rate=1e-4", "train.grad_clip=0.5"])
def test_settings_that_keep_shapes_data_and_seeds_may_change(change):
    saved, now = load_config(None, []), load_config(None, [change])
    (c,) = check_resume(saved, now, "w")
    assert c.key == change.split("=")[0]


@pytest.mark.parametrize("change", ["model.d_model=64", "model.n_layers=2", "model.mixer_pattern=[lightning]",
                                    "model.lightning.decay_convention=paper", "model.lightning.lrpe_layers=[1]",
                                    "model.vocab_multiple=64", "data.tokenizer=t.json", "data.seq_len=64",
                                    "data.max_documents=10", "data.shuffle_seed=1", "data.split_seed=1",
                                    "train.global_batch_size=32", "train.seed=1", "train.grad_clip=0"])
def test_settings_that_fix_shapes_data_or_seeds_are_refused_by_name(change):
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"holds checkpoints of a different run \({key}: "):
        check_resume(load_config(None, []), load_config(None, [change]), "w")


# ----------------------------------------------------------------------------- a smaller mesh, end to end

STEPS = 6
OVERRIDES = tiny_overrides(**{"train.steps": STEPS, "checkpoint.every": 3, "train.eval_every": 3})
SAVED_MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


@pytest.fixture(scope="module")
def saved_on_8_devices(tmp_path_factory):
    """6 steps on 8 devices with data2/fsdp2/tensor2: the reference losses and the workdir."""
    workdir = tmp_path_factory.mktemp("mesh222")
    result = train(load_config(REPO / "configs/debug.yaml", OVERRIDES + SAVED_MESH), workdir)
    assert len(jax.devices()) == 8 and result.final_step == STEPS
    return workdir, result.losses


@pytest.mark.slow
@pytest.mark.parametrize("devices, mesh", [(1, ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]),
                                           (4, ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1"])])
def test_resume_on_fewer_devices_with_another_mesh_continues_the_run(saved_on_8_devices, tmp_path, devices, mesh):
    saved, reference = saved_on_8_devices
    workdir = rewind(saved, tmp_path / "resumed", 3)
    proc = subprocess.run([*jaxeff_cmd(), "train", "--config", "configs/debug.yaml", "--workdir", str(workdir),
                           *OVERRIDES, *mesh], capture_output=True, text=True, env=subprocess_env(devices),
                          timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    changed = [line for line in proc.stdout.splitlines() if "changed on resume:" in line]
    assert len(changed) == 1, proc.stdout
    for key, old in (("mesh.data", 2), ("mesh.fsdp", 2), ("mesh.tensor", 2)):
        new = int(next(m for m in mesh if m.startswith(key)).split("=")[1])
        assert (f"{key} {old} -> {new}" in changed[0]) == (old != new), changed[0]
    assert "resumed from checkpoint step 3" in proc.stdout
    resumed = tb_losses(workdir)
    assert sorted(resumed) == [4, 5, 6]
    np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [reference[s] for s in (4, 5, 6)], rtol=1e-5)


# ----------------------------------------------------------------------------- written before config sections

TNL = {"model.mixer_pattern": "[lightning]", "model.channel_mixer_pattern": "[sglu]", "model.norm": "srms",
       "model.scale_embeddings": True, "model.lightning.block_size": 16, "model.lightning.impl": "chunked",
       "train.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 3, "mesh.data": 2, "checkpoint.async_save": False}
OLD_CODE_LOSSES = [5.797426, 5.842987, 5.695177, 5.805342, 5.687150, 5.633945]  # tests/data/legacy_flat_keys/README.md


@pytest.mark.slow
def test_a_workdir_with_flat_keys_resumes_exactly_and_its_export_loads(tmp_path):
    cfg = load_config(None, tiny_overrides(**TNL))
    fresh = train(cfg, tmp_path / "fresh")
    np.testing.assert_allclose([fresh.losses[s] for s in range(1, 7)], OLD_CODE_LOSSES, rtol=1e-5)

    workdir = tmp_path / "old"
    shutil.copytree(LEGACY / "workdir", workdir)
    resumed = train(load_config(None, tiny_overrides(**TNL)), workdir)
    assert sorted(resumed.losses) == [5, 6]
    np.testing.assert_allclose([resumed.losses[s] for s in (5, 6)], [fresh.losses[s] for s in (5, 6)], rtol=1e-5)

    # The old export (step 6 of the old-code run) loads, and equals the old run resumed by this code.
    old_export = load_inference_model(LEGACY / "export")
    assert old_export.step == 6 and old_export.model_config.lightning.block_size == 16
    new_export, exported_step = export_checkpoint(workdir, tmp_path / "export")
    assert exported_step == 6
    new_params = ocp.StandardCheckpointer().restore(new_export / "params")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
                 jax.device_get(old_export.params), new_params)
