"""Sequence parallelism (`mesh.sequence`): every token mixer trains with one device's numerics.

For each mixer a tiny model takes three optimizer steps on the same batches on 1 device, on `sequence=8` and on
`data=2 sequence=4` (with a chunked loss); losses agree to 1e-5 and parameters to 1e-4 relative / 1e-5 absolute
(as the data/fsdp/tensor mesh test). The sequence (96) splits into chunks of 12 or 24 tokens: not a multiple of
the kernels' blocks (16).
"""

import jax
import numpy as np
import pytest

from helpers import rewind, tiny_config
from jaxeff.parallel.sharding import batch_sharding
from jaxeff.train import train
from jaxeff.train.comm_report import build_train_step
from jaxeff.train.optimizer import make_optimizer
from jaxeff.train.state import init_state

SEQ_LEN = 96
MIXERS = {
    "attention": {"model.mixer_pattern": "[attention]"},
    "lightning": {"model.mixer_pattern": "[lightning]", "model.lightning.block_size": 16,
                  "model.lightning.lrpe_layers": "[0]"},
    "mlstm": {"model.mixer_pattern": "[mlstm]", "model.mlstm.chunk_size": 16, "model.n_kv_heads": "null"},
    "companion": {"model.mixer_pattern": "[companion]", "model.companion.state_dim": 8,
                  "model.companion.n_kernels": 4},
    "s2": {"model.mixer_pattern": "[s2]", "model.s2.block_size": 8, "model.s2.local_blocks": 2,
           "model.s2.vert_stride": 3},
    "sink_window": {"model.mixer_pattern": "[sink_window]", "model.s2.block_size": 8, "model.s2.local_blocks": 2,
                    "model.s2.sink_blocks": 1},
    "moe": {"model.mixer_pattern": "[lightning]", "model.lightning.block_size": 16,
            "model.channel_mixer_pattern": "[moe]", "model.moe.n_experts": 4, "model.moe.top_k": 2,
            "model.moe.capacity_factor": "null"},
}
# The split runs also chunk the loss (model.loss_chunk 5: chunks of 4 of the 12 or 3 of the 24 tokens per device).
MESHES = {"sequence8": {"mesh.data": 1, "mesh.sequence": 8, "model.loss_chunk": 5},
          "data2_sequence4": {"mesh.data": 2, "mesh.sequence": 4, "model.loss_chunk": 5}}
# MoE also with its experts split: the all-to-all over "expert" carries tokens that "sequence" split
EXTRA_MESHES = {"moe": {"expert2_sequence4": {"mesh.data": 1, "mesh.expert": 2, "mesh.sequence": 4}}}


def config(mixer: str, **mesh):
    return tiny_config(**{"data.seq_len": SEQ_LEN, "model.compute_dtype": "float32", **MIXERS[mixer], **mesh})


def train_steps(cfg, devices, batches):
    """(losses, parameters) after one train step per batch, the state and batches laid out as the trainer does."""
    step = build_train_step(cfg, devices, with_data=False).compile()
    state = init_state(step.task.model, make_optimizer(cfg.train), step.shardings, cfg.train.seed,
                       step.task.init_input)
    losses = []
    for batch in batches:
        state, metrics = step.compiled(state, jax.device_put(batch, batch_sharding(step.mesh)))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"])


def random_batches(cfg, n: int = 3):
    rng = np.random.default_rng(0)
    shape = (cfg.train.global_batch_size, cfg.data.seq_len)
    return [{"inputs": (t := rng.integers(0, 256, shape, np.int32)), "targets": np.roll(t, -1, axis=1)}
            for _ in range(n)]


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_sequence_parallel_training_equals_one_device(mixer):
    single_cfg = config(mixer, **{"mesh.data": 1})
    batches = random_batches(single_cfg)
    losses_1, params_1 = train_steps(single_cfg, jax.devices()[:1], batches)
    for name, mesh in {**MESHES, **EXTRA_MESHES.get(mixer, {})}.items():
        losses, params = train_steps(config(mixer, **mesh), jax.devices()[:8], batches)
        np.testing.assert_allclose(losses, losses_1, rtol=1e-5, err_msg=f"{mixer} on {name}")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{mixer} {name}"),
                     params, params_1)


def test_checkpoints_move_between_a_sequence_split_and_one_device(tmp_path):
    """Saved with data2 x sequence4, resumed on one device, and the reverse: the runs continue with the losses of
    the uninterrupted run."""
    base = {**MIXERS["lightning"], "data.seq_len": 64, "train.steps": 4, "checkpoint.every": 2,
            "train.eval_every": 2, "checkpoint.async_save": False}
    meshes = {"split": {"mesh.data": 2, "mesh.sequence": 4}, "one": {"mesh.data": 1}}
    runs = {name: train(tiny_config(**base, **mesh), tmp_path / name) for name, mesh in meshes.items()}
    np.testing.assert_allclose(list(runs["split"].losses.values()), list(runs["one"].losses.values()), rtol=1e-5)
    for saved, resumed_on in (("split", "one"), ("one", "split")):
        workdir = rewind(tmp_path / saved, tmp_path / f"{saved}_to_{resumed_on}", 2)
        resumed = train(tiny_config(**base, **meshes[resumed_on]), workdir)
        assert sorted(resumed.losses) == [3, 4]
        np.testing.assert_allclose([resumed.losses[s] for s in (3, 4)],
                                   [runs[resumed_on].losses[s] for s in (3, 4)], rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_equals_the_whole_logits_loss(tie):
    """model.loss_chunk: the logits of at most that many tokens per device at a time (recomputed in the backward);
    5 does not divide the 32 tokens, so chunks of 4 are used. Loss and gradients as with all logits at once."""
    import jax.numpy as jnp

    from jaxeff.tasks import build_task

    losses = {}
    for chunk in (0, 5):
        cfg = tiny_config(**{"model.loss_chunk": chunk, "model.tie_embeddings": str(tie).lower(),
                             "model.logit_soft_cap": 30.0, "model.compute_dtype": "float32"})
        task = build_task(cfg, with_data=False)
        params = task.model.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"]
        batch = jax.tree.map(jnp.asarray, random_batches(cfg, 1)[0])
        losses[chunk] = jax.jit(jax.value_and_grad(lambda p: task.loss(p, batch)[0]))(params)
    np.testing.assert_allclose(losses[5][0], losses[0][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), losses[5][1], losses[0][1])


@pytest.mark.parametrize("mesh, shares", [
    ({"mesh.data": 2, "mesh.sequence": 8}, {0: (0, 2), 1: (1, 2)}),  # one share of the rows per host
    ({"mesh.data": 1, "mesh.sequence": 16}, {0: (0, 1), 1: (0, 1)}),  # rows split over both hosts: both load all
    ({"mesh.data": 16}, {0: (0, 2), 1: (1, 2)}),
])
def test_hosts_that_hold_the_same_rows_load_the_same_share(mesh, shares):
    """Two H100 hosts (compile-only devices, 8 each): a sequence group spanning them loads the same rows on both."""
    from jaxeff.parallel.hardware import compile_only_devices, get_target
    from jaxeff.parallel.mesh import build_mesh, process_row_shards

    devices = compile_only_devices(get_target("h100x16"))
    cfg = tiny_config(**{"data.seq_len": 64, "train.global_batch_size": 16, **mesh})
    assert process_row_shards(build_mesh(cfg, devices), cfg.train.global_batch_size) == shares


@pytest.mark.parametrize("target, sequence", [("h100x8", 8), ("v5e:2x2", 4)])
def test_the_sequence_split_step_compiles_for_gpu_and_tpu(target, sequence):
    """Every token mixer's sharded form, with the Pallas kernels of lightning and mLSTM inside the shard_map, compiles
    for an H100 node and a TPU v5e slice (compile-only devices)."""
    from jaxeff.train.plan import make_plan

    cfg = tiny_config(**{"data.seq_len": 256, "model.n_layers": 6, "train.global_batch_size": 2, "mesh.data": 1,
                         "mesh.sequence": sequence, "model.mixer_pattern": "[lightning, mlstm, companion, attention, s2, "
                         "sink_window]", "model.n_kv_heads": "null", "model.lightning.impl": "pallas",
                         "model.mlstm.impl": "pallas", "model.s2.block_size": 16, "model.companion.state_dim": 8,
                         "model.companion.n_kernels": 4, "model.compute_dtype": "bfloat16", "model.loss_chunk": 8})
    plan = make_plan(cfg, target)
    assert plan.fits and plan.mesh["sequence"] == sequence
    assert plan.collectives["all-gather"]["count"] >= 6  # at least one exchange per layer
