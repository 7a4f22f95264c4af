"""The linear mixers' sequence-parallel forms (pallas_kernels/*/sequence_parallel.py) equal the whole-sequence op,
forward and gradients, on simulated CPU devices: chunks of a length that is not a multiple of the kernels' block,
float32 and float64, and the chunk states against the op's own final state."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import float64_if, grads_of, split_over_devices, worst_relative_error
from pallas_kernels.lightning_attention import lightning_attention
from pallas_kernels.lightning_attention.sequence_parallel import chunk_state as lightning_chunk_state
from pallas_kernels.lightning_attention.sequence_parallel import sharded_lightning_attention
from pallas_kernels.mlstm import mlstm
from pallas_kernels.mlstm.sequence_parallel import chunk_state as mlstm_chunk_state
from pallas_kernels.mlstm.sequence_parallel import sharded_mlstm


ROW = P("data", "sequence")


def lightning_inputs(rng, dtype, b=2, s=8 * 12, h=2, k=8, w=4):
    q, kk = (jnp.asarray(rng.standard_normal((b, s, h, k)) * 0.5, dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, s, h, w)), dtype)
    rate = jnp.asarray([0.05, 0.4], dtype)[:h]
    return q, kk, v, rate


@pytest.mark.parametrize("dtype,impl,mesh", [(jnp.float32, "chunked", (1, 8)), (jnp.float64, "chunked", (2, 4)),
                                             (jnp.float32, "pallas", (2, 4))])
def test_sharded_lightning_equals_whole_sequence(dtype, impl, mesh):
    # 96 tokens over 8 (4) devices: chunks of 12 (24), not a multiple of the block (8)
    with float64_if(dtype):
        check_lightning(dtype, impl, mesh)


def check_lightning(dtype, impl, mesh):
    rng = np.random.default_rng(0)
    q, k, v, rate = lightning_inputs(rng, dtype)
    whole = lambda q, k, v: lightning_attention(q, k, v, rate, block_size=8, impl=impl)  # noqa: E731
    split = lambda q, k, v: split_over_devices(  # noqa: E731
        functools.partial(sharded_lightning_attention, block_size=8, impl=impl), (q, k, v, rate),
        (ROW, ROW, ROW, P()), ROW, {"data": mesh[0], "sequence": mesh[1]})
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(split(q, k, v), whole(q, k, v), **tol)
    cot = jnp.asarray(rng.standard_normal(v.shape), dtype)
    for got, want in zip(grads_of(split, (q, k, v), cot), grads_of(whole, (q, k, v), cot)):
        np.testing.assert_allclose(got, want, **tol)


def test_lightning_chunk_state_is_the_ops_final_state():
    with float64_if(jnp.float64):
        q, k, v, rate = lightning_inputs(np.random.default_rng(1), jnp.float64)
        _, final = lightning_attention(q, k, v, rate, return_final_state=True, impl="reference")
        np.testing.assert_allclose(lightning_chunk_state(k, v, rate), final, rtol=1e-12)


def mlstm_inputs(rng, dtype, b=2, s=8 * 12, h=2, k=8, w=4):
    q, kk = (jnp.asarray(rng.standard_normal((b, s, h, k)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, s, h, w)), dtype)
    i = jnp.asarray(rng.standard_normal((b, s, h)) * 3, dtype)  # spread input gates: the stabiliser moves
    f = jnp.asarray(rng.standard_normal((b, s, h)) * 2 + 3, dtype)
    return q, kk, v, i, f


# eps = 0: the split form is exact (float64 to 1e-10). With eps > 0 the normaliser max(|q n|, exp(-m)) + eps
# depends on the stabiliser m through eps exp(m); the op does not differentiate the m it starts from (nor does the
# Pallas kernel differentiate m at all), so gate gradients differ by that term: here 5e-6 (i) and 1.5e-5 (f) of
# their largest entry in float64, the same size as the Pallas kernel's own gap to the chunked form on one device.
@pytest.mark.parametrize("dtype,impl,mesh,eps", [(jnp.float32, "chunked", (1, 8), 1e-6),
                                                 (jnp.float64, "chunked", (2, 4), 0.0),
                                                 (jnp.float64, "chunked", (2, 4), 1e-6),
                                                 (jnp.float32, "pallas", (2, 4), 1e-6)])
def test_sharded_mlstm_equals_whole_sequence(dtype, impl, mesh, eps):
    with float64_if(dtype):
        check_mlstm(dtype, impl, mesh, eps)


def check_mlstm(dtype, impl, mesh, eps):
    rng = np.random.default_rng(2)
    args = mlstm_inputs(rng, dtype)
    whole = lambda *a: mlstm(*a, chunk_size=8, eps=eps, impl=impl)  # noqa: E731
    split = lambda *a: split_over_devices(  # noqa: E731
        functools.partial(sharded_mlstm, chunk_size=8, eps=eps, impl=impl), a, (ROW,) * 5, ROW,
        {"data": mesh[0], "sequence": mesh[1]})
    exact = dtype == jnp.float64 and eps == 0.0
    out_tol = 1e-12 if dtype == jnp.float64 else 5e-6
    grad_tol = {"q": 2e-5, "k": 2e-5, "v": 2e-5, "i": 2e-5, "f": 5e-5}
    assert worst_relative_error(split(*args), whole(*args)) < out_tol
    cot = jnp.asarray(rng.standard_normal(args[2].shape), dtype)
    for name, got, want in zip("qkvif", grads_of(split, args, cot), grads_of(whole, args, cot)):
        err = worst_relative_error(got, want)
        assert err < (1e-10 if exact else grad_tol[name]), f"gradient of {name}: {err:.2e}"


def test_mlstm_chunk_state_is_the_ops_final_state():
    """From the op's zero start (m = 0) the state is the same matrix memory at another scale: C exp(m) agrees."""
    with float64_if(jnp.float64):
        q, k, v, i, f = mlstm_inputs(np.random.default_rng(3), jnp.float64)
        _, (c, n, m) = mlstm(q, k, v, i, f, return_final_state=True, impl="reference")
        c_loc, n_loc, m_loc, _ = mlstm_chunk_state(k, v, i, f)
    np.testing.assert_allclose(c_loc * np.exp(m_loc)[..., None, None], c * np.exp(m)[..., None, None], rtol=1e-10)
    np.testing.assert_allclose(n_loc * np.exp(m_loc)[..., None], n * np.exp(m)[..., None], rtol=1e-10)
