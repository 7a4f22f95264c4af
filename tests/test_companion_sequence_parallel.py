"""The companion SSM's sequence-parallel form (pallas_kernels/companion_ssm/sequence_parallel.py) equals the
whole-sequence op, forward and gradients (u, a, b, c, skip), on simulated CPU devices, float32 and float64; and its
pieces (a chunk's final state, the free response of an entering state, powers of A) equal the recurrence."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import float64_if, grads_of, split_over_devices, worst_relative_error
from pallas_kernels.companion_ssm import companion_ssm
from pallas_kernels.companion_ssm import reference as ref
from pallas_kernels.companion_ssm.sequence_parallel import (chunk_kernels, chunk_state, free_response, power_of_a,
                                                            sharded_companion_ssm)

ROW = P("data", "sequence")


def companion_params(rng, h, d, kind):
    """a, b, c [h, d] in float64. kind: "l1" (a / |a|_1, the layer's norm_order 1), "l1_positive" (|a| / |a|_1: an
    eigenvalue exactly at 1, nothing decays) or "raw" (0.3 N(0, 1): here a spectral radius up to ~1.05, growing)."""
    a, b, c = rng.standard_normal((3, h, d))
    if kind == "l1":
        a = a / np.abs(a).sum(-1, keepdims=True)
    elif kind == "l1_positive":
        a = np.abs(a) / np.abs(a).sum(-1, keepdims=True)
    else:
        a = 0.3 * a
    return a, b * d**-0.5, c * d**-0.5


# 96 tokens over 8 (4) devices: chunks of 12 (24); d = 16 > 12 puts the whole state inside one chunk's reach.
CASES = [(jnp.float32, (1, 8), "l1", 8, True), (jnp.float32, (2, 4), "raw", 8, False),
         (jnp.float32, (2, 4), "l1_positive", 16, True), (jnp.float64, (2, 4), "l1", 8, True),
         (jnp.float64, (1, 8), "raw", 16, True), (jnp.float64, (1, 8), "l1_positive", 8, False)]


@pytest.mark.parametrize("dtype,mesh,kind,d,with_skip", CASES)
def test_sharded_companion_equals_whole_sequence(dtype, mesh, kind, d, with_skip):
    with float64_if(dtype):
        check_sharded(dtype, mesh, kind, d, with_skip)


def check_sharded(dtype, mesh, kind, d, with_skip, b=2, s=96, h=3):
    rng = np.random.default_rng(d + len(kind))
    a, bb, c = (jnp.asarray(x, dtype) for x in companion_params(rng, h, d, kind))
    u = jnp.asarray(rng.standard_normal((b, s, h)), dtype)
    skip = jnp.asarray(rng.standard_normal(h), dtype)
    args = (u, a, bb, c, skip) if with_skip else (u, a, bb, c)
    specs = (ROW, P(), P(), P(), P())[: len(args)]
    whole = lambda *x: companion_ssm(*x)  # noqa: E731
    split = lambda *x: split_over_devices(sharded_companion_ssm, x, specs, ROW,
                                          {"data": mesh[0], "sequence": mesh[1]})  # noqa: E731
    tol = 1e-5 if dtype == jnp.float32 else 1e-10
    got, want = jax.jit(split)(*args), whole(*args)
    assert got.dtype == want.dtype == dtype
    assert worst_relative_error(got, want) < tol
    cot = jnp.asarray(rng.standard_normal(u.shape), dtype)
    for name, g, w in zip("u a b c skip".split(), grads_of(split, args, cot), grads_of(whole, args, cot)):
        assert worst_relative_error(g, w) < tol, (name, worst_relative_error(g, w))


@pytest.mark.parametrize("length,d", [(12, 8), (5, 8), (1, 4), (40, 16)])
def test_chunk_state_is_the_recurrences_final_state(length, d):
    with float64_if(jnp.float64):
        rng = np.random.default_rng(length)
        a, b, c = (jnp.asarray(x) for x in companion_params(rng, 3, d, "raw"))
        u = jnp.asarray(rng.standard_normal((2, length, 3)))
        _, final = ref.recurrence(u, a, b, c, jnp.zeros(3))
        assert worst_relative_error(chunk_state(u, a, b), final) < 1e-12


def test_free_response_continues_an_entering_state():
    with float64_if(jnp.float64):
        rng = np.random.default_rng(7)
        a, b, c = (jnp.asarray(x) for x in companion_params(rng, 3, 8, "l1"))
        u, x_in = jnp.asarray(rng.standard_normal((2, 12, 3))), jnp.asarray(rng.standard_normal((2, 3, 8)))
        _, _, f_DM = chunk_kernels(a, b, c, 12)
        y = companion_ssm(u, a, b, c) + free_response(x_in, f_DM, 12)
        assert worst_relative_error(y, companion_ssm(u, a, b, c, initial_state=x_in)) < 1e-12


@pytest.mark.parametrize("n", [1, 7, 8, 12, 96])
def test_powers_of_a_are_matrix_powers(n):
    with float64_if(jnp.float64):
        a, _, _ = companion_params(np.random.default_rng(n), 3, 8, "raw")
        want = [np.linalg.matrix_power(np.asarray(ref.companion_matrix(jnp.asarray(a)))[i], n)[:, 0] for i in range(3)]
        assert worst_relative_error(power_of_a(jnp.asarray(a), n), np.stack(want)) < 1e-12
