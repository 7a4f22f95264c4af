"""Every Pallas op, forward and backward, compiled by the real TPU compiler (Mosaic included) for one TPU v5e chip
from this CPU host: libtpu (the `jax[tpu]` extra, which `make test` installs at the jax version in use) provides
compile-only TPU devices through `jax.experimental.topologies`. Interpret-mode tests check the numbers; these check
that the kernels are valid Mosaic programs, at a realistic shape (bf16, 8192 tokens, 8 heads of 128)."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from pallas_kernels.infllm import infllm_attention
from pallas_kernels.lightning_attention import lightning_attention
from pallas_kernels.mlstm import mlstm
from pallas_kernels.s2_attention import s2_attention

B, S, H, D = 1, 8192, 8, 128


@pytest.fixture(scope="module")
def v5e_chip():
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail(f'libtpu is missing: `make setup-dev`, or pip install "jax[tpu]=={jax.__version__}"')
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    assert topology.devices[0].device_kind == "TPU v5 lite"
    return SingleDeviceSharding(topology.devices[0])


OPS = {
    "lightning": (lambda q, k, v: lightning_attention(q, k, v, jnp.linspace(0.05, 0.9, H), impl="pallas",
                                                      block_size=128), [(H, D)] * 3, 3),
    "mlstm": (lambda q, k, v, i, f: mlstm(q, k, v, i, f, impl="pallas", chunk_size=64),
              [(H, D)] * 3 + [(H,)] * 2, 5),
    "s2": (lambda q, k, v: s2_attention(q, k, v, block_size=64, local_blocks=4, vert_stride=4, impl="pallas"),
           [(H, D), (H // 2, D), (H // 2, D)], 3),
    "infllm": (lambda q, k, v: infllm_attention(q, k, v, block_size=64, local_blocks=4, topk=16, impl="pallas"),
               [(H, D), (H // 2, D), (H // 2, D)], 3),
}


@pytest.mark.parametrize("name", OPS)
def test_op_forward_and_backward_compile_for_a_v5e_chip(v5e_chip, name):
    op, shapes, min_kernels = OPS[name]
    args = [jax.ShapeDtypeStruct((B, S, *shape), jnp.bfloat16 if len(shape) == 2 else jnp.float32, sharding=v5e_chip)
            for shape in shapes]

    def loss(*xs):
        return jnp.sum(op(*xs).astype(jnp.float32))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))))).trace(*args).lower().compile()
    text = compiled.as_text()
    # the Mosaic kernels (forward and backward), never the Triton bodies or the interpreter
    assert text.count("tpu_custom_call") >= min_kernels, text.count("tpu_custom_call")
    assert "triton" not in text
    assert compiled.memory_analysis().temp_size_in_bytes < 16 * 2**30  # fits a v5e chip's HBM


@pytest.mark.parametrize("act_bits,i", [(8, 1024), (6, 10944)])
def test_quant_matmul_compiles_for_a_v5e_chip(v5e_chip, act_bits, i):
    """The serving matmul (forward only): int8 codes, int32 accumulation per group of 128, as a Mosaic kernel. 10944
    inputs: xLSTM 7B's down projection, 86 groups, whose blocks overflowed the scoped VMEM when loaded at once."""
    from pallas_kernels.quant_matmul import quant_matmul

    n, o, g = 256, 384, 128
    args = [jax.ShapeDtypeStruct((n, i), jnp.bfloat16, sharding=v5e_chip),
            jax.ShapeDtypeStruct((i, o), jnp.int8, sharding=v5e_chip),
            jax.ShapeDtypeStruct((-(-i // g), o), jnp.float32, sharding=v5e_chip)]
    fn = lambda x, w, s: quant_matmul(x, w, s, group_size=g, act_bits=act_bits, impl="pallas")  # noqa: E731
    text = jax.jit(fn).trace(*args).lower().compile().as_text()
    assert text.count("tpu_custom_call") == 1 and "triton" not in text
