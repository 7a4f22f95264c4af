"""`jaxeff plan`: the train step compiled for machines this host lacks (an H100 node, TPU slices), its memory figures
checked against parameter counts done by hand, its collectives against what data parallelism must exchange, and
its errors (unknown target, missing compiler plugin)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxeff.config import load_config
from jaxeff.parallel import hardware
from jaxeff.parallel.hardware import MissingCompiler, UnknownTarget, get_target
from jaxeff.train.plan import HEADROOM, format_plan, make_plan

F32, BF16 = 4, 2


def _debug_lm(*overrides):
    return load_config("configs/tnl-debug.yaml", ["data.seq_len=256", "train.global_batch_size=16", *overrides])


def _n_params(cfg) -> int:
    """Parameter count by hand from the model's initialised shapes (no sharding involved)."""
    import jax
    import jax.numpy as jnp

    from jaxeff.tasks import build_task

    task = build_task(cfg, with_data=False)
    shapes = jax.eval_shape(lambda: task.model.init(jax.random.key(0), jnp.zeros(task.init_input.shape,
                                                                                  task.init_input.dtype)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_a_data_parallel_plan_on_an_h100_node_matches_counts_by_hand():
    cfg = _debug_lm("mesh.data=-1")
    plan = make_plan(cfg, "h100x8")
    n = _n_params(cfg)
    assert (plan.devices, plan.hosts, plan.mesh["data"]) == (8, 1, 8)
    assert plan.param_bytes == n * F32  # replicated, float32 master weights
    # AdamW: two float32 moments per parameter, plus a few scalars (step counts, the non-finite guard)
    assert 2 * n * F32 <= plan.optimizer_bytes <= 2 * n * F32 + 1024
    assert plan.peak_bytes >= plan.param_bytes + plan.optimizer_bytes
    assert plan.alias_bytes >= plan.param_bytes + plan.optimizer_bytes  # the state is donated
    assert plan.fits and plan.peak_bytes <= HEADROOM * hardware.CHIPS["H100"].hbm_bytes
    # data parallelism all-reduces every gradient (in the bf16 compute dtype: XLA reduces the gradient of the bf16
    # copy of each weight before converting it), and a ring all-reduce over 8 devices sends 2 * 7/8 of it
    reduced = plan.collectives["all-reduce"]
    assert n * BF16 <= reduced["bytes"] <= n * F32
    assert plan.collectives["total"]["wire_bytes"] >= 2 * 7 / 8 * n * BF16
    # 3 x forward FLOPs of the task, per step
    tokens = 16 * 256
    assert plan.model_flops_per_step > 6 * n * tokens * 0.5
    assert plan.est_step_s == max(plan.times().values()) > 0
    assert 0 < plan.est_mfu <= 1

    lines = format_plan(plan, "tnl-debug.yaml")
    summary = json.loads(lines[-1])
    assert set(summary) == {"target", "devices", "fits", "peak_bytes_per_device", "param_bytes", "optimizer_bytes",
                            "temp_bytes", "flops_per_step", "est_step_s", "est_mfu", "compile_s"}
    assert summary["peak_bytes_per_device"] == plan.peak_bytes and summary["target"] == "h100x8"
    assert any("all-reduce" in line for line in lines)


def test_fsdp_on_a_tpu_slice_shards_the_state_and_reports_xla_costs():
    cfg = _debug_lm("mesh.data=1", "mesh.fsdp=-1")
    plan = make_plan(cfg, "v5e:2x2")
    n = _n_params(cfg)
    assert plan.devices == 4 and plan.mesh["fsdp"] == 4
    # FSDP splits the embedding-axis of every matrix over 4 chips; only small vectors (norm scales) stay whole
    assert n * F32 / 4 <= plan.param_bytes < n * F32 / 2
    assert plan.optimizer_bytes < n * F32  # the moments are sharded as the parameters
    assert plan.collectives["all-gather"]["count"] > 0  # parameters gathered for the matmuls
    assert plan.xla_flops_per_device > 0 and plan.xla_bytes_per_device > 0  # the TPU compiler reports costs


def test_a_step_too_big_for_the_chip_does_not_fit():
    # 4096 x 2048 tokens in one step: tens of GiB of activations per v5e chip (16 GiB). The TPU compiler refuses
    # such a program itself; the plan reports its figure instead of failing.
    plan = make_plan(_debug_lm("mesh.data=-1", "data.seq_len=2048", "train.global_batch_size=4096"), "v5e:2x2")
    assert not plan.fits and "HBM" in plan.refused
    assert plan.temp_bytes > 16 * 2**30 and plan.peak_bytes > plan.temp_bytes
    text = "\n".join(format_plan(plan, "big"))
    assert "does NOT fit" in text and "refused" in text
    assert json.loads(text.splitlines()[-1])["fits"] is False


def test_targets_by_name():
    assert get_target("h100x16").hosts == 2 and get_target("h100x16").devices == 16
    assert get_target("v5p:2x2x1").chip.name == "TPU v5p" and get_target("v5p:2x2x1").devices == 4
    assert get_target("v5e:16x16").devices == 256
    with pytest.raises(UnknownTarget, match="h100x8"):
        get_target("a100x8")


def test_a_missing_compiler_plugin_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingCompiler, match=r'pip install "jax\[cuda12\]=='):
        hardware.require_compiler(get_target("h100x8"))
    with pytest.raises(MissingCompiler, match=r'pip install "jax\[tpu\]=='):
        hardware.require_compiler(get_target("v5e:2x2"))


def test_cli_unknown_target_exits_2_listing_the_targets():
    run = subprocess.run([sys.executable, "-m", "jaxeff", "plan", "--config", "configs/tnl-debug.yaml", "--target",
                          "h100x9"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "unknown target 'h100x9'" in run.stderr and "h100x8" in run.stderr and "v5e:2x2" in run.stderr
