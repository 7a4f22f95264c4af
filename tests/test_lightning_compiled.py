"""Lightning attention with wide heads (TransNormerLLM's LRPE doubles the q/k head width: d_k = 2 d_v), forward and
backward, compiled by the real compilers from this CPU host: Triton for one H100 (its 227 KB of shared memory per
program was exceeded by the d_k 256 x d_v 128 backward before the kernels split d_v into tiles and shrank the block
for wide d_k) and Mosaic for one TPU v5e chip (VMEM). Shared memory and VMEM per program do not depend on batch,
heads or sequence length, so the shapes are small; tests/test_compiled_for_h100.py / _tpu.py compile the op at a
realistic size."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from jaxeff.parallel.hardware import compile_only_devices, get_target
from pallas_kernels.lightning_attention import lightning_attention

B, S, H = 1, 300, 2  # ragged: not a multiple of any block


@pytest.fixture(scope="module", params=["h100x1", "v5e:2x2"])
def chip(request):
    return request.param, SingleDeviceSharding(compile_only_devices(get_target(request.param))[0])


@pytest.mark.parametrize("dk,dv,block", [(256, 128, 64), (256, 512, 128)])
def test_wide_heads_forward_and_backward_compile(chip, dk, dv, block):
    name, sharding = chip
    args = [jax.ShapeDtypeStruct((B, S, H, d), jnp.bfloat16, sharding=sharding) for d in (dk, dk, dv)]

    def loss(q, k, v):
        o = lightning_attention(q, k, v, jnp.linspace(0.05, 0.9, H), impl="pallas", block_size=block)
        return jnp.sum(o.astype(jnp.float32))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(*args).lower().compile()
    marker = "__gpu$xla.gpu.triton" if name.startswith("h100") else "tpu_custom_call"
    assert compiled.as_text().count(marker) >= 4  # forward, backward intra-block, dq sweep, dk/dv sweep
