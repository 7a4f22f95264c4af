"""The token mixers' kernel ops run per shard (jaxeff.parallel.sharding.per_shard) under a multi-device mesh: the
loss and its gradients on data2 x fsdp2 x tensor2 equal the one-device ones, and the op really sits in a shard_map
(XLA would not partition a Mosaic kernel, nor a Triton one without gathering its operands)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.config import load_config
from jaxeff.parallel.mesh import build_mesh
from jaxeff.parallel.sharding import batch_sharding
from jaxeff.tasks import build_task


@pytest.mark.parametrize("config", ["tnl-debug.yaml", "xlstm-debug.yaml", "s2-debug.yaml"])
def test_sharded_loss_and_grads_equal_one_device(config):
    cfg = load_config(f"configs/{config}", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "data.seq_len=64",
                                            "train.global_batch_size=8"])
    task = build_task(cfg, with_data=False)
    params = task.model.init(jax.random.key(0), jnp.zeros(task.init_input.shape, task.init_input.dtype))["params"]
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.integers(0, 250, v.shape), v.dtype) for k, v in task.batch_shapes(8).items()}
    grad_fn = jax.value_and_grad(lambda p, b: task.loss(p, b)[0])
    loss_1, grads_1 = jax.jit(grad_fn)(params, batch)

    mesh = build_mesh(cfg, jax.devices()[:8])
    with jax.set_mesh(mesh):
        lowered = jax.jit(grad_fn, in_shardings=(None, batch_sharding(mesh))).lower(params, batch)
        loss_8, grads_8 = lowered.compile()(params, batch)
    text = lowered.as_text()
    assert "shard_map" in text or "manual_computation" in text, "the mixer's op is not in a shard_map"
    np.testing.assert_allclose(float(loss_8), float(loss_1), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(grads_8), jax.tree.leaves(grads_1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-5)
