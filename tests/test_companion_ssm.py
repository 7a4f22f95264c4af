"""Companion SSM op: the three kernels agree with explicit matrix powers; FFT convolution = the recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.companion_ssm import companion_kernel, companion_ssm, companion_step


def params(seed, h, d, dtype=np.float32, normalise=True):
    rng = np.random.default_rng(seed)
    a, b, c = rng.standard_normal((3, h, d)).astype(dtype)
    if normalise:  # as the SpaceTime layer does (L1), keeping powers of A bounded
        a = a / np.abs(a).sum(-1, keepdims=True)
    return a, b, c


def numpy_kernel(a, b, c, length):
    """c^T A^l b with A built explicitly (S + a e_d^T) and multiplied out in float64 NumPy."""
    h, d = a.shape
    out = np.zeros((h, length))
    for i in range(h):
        A = np.eye(d, k=-1)
        A[:, -1] += a[i]
        x = np.asarray(b[i], np.float64)
        for l in range(length):
            out[i, l] = np.dot(c[i], x)
            x = A @ x
    return out


def rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / np.max(np.abs(y)))


@pytest.mark.parametrize("h, d, length", [(3, 8, 64), (2, 64, 1024), (2, 100, 37), (1, 5, 1)])
@pytest.mark.parametrize("impl", ["reference", "krylov", "fast", "auto"])
def test_kernels_equal_explicit_matrix_powers(h, d, length, impl):
    a, b, c = params(h * d + length, h, d)
    expected = numpy_kernel(a, b, c, length)
    k = companion_kernel(a, b, c, length, impl=impl)
    assert k.shape == (h, length) and k.dtype == jnp.float32
    assert rel(k, expected) < 2e-5, rel(k, expected)


def test_float64_kernels_agree_to_rounding_even_with_an_unnormalised_a():
    with jax.enable_x64(True):
        a, b, c = params(3, 2, 12, np.float64, normalise=False)
        a = 0.5 * a / np.abs(a).sum(-1, keepdims=True) + 0.05 * np.sign(a)  # not L1-normalised
        expected = numpy_kernel(a, b, c, 200)
        for impl in ("reference", "krylov", "fast"):
            k = companion_kernel(a, b, c, 200, impl=impl)
            assert k.dtype == jnp.float64 and rel(k, expected) < 1e-10, impl


def test_fft_convolution_equals_the_recurrence_with_skip_and_initial_state():
    a, b, c = params(4, 3, 6)
    rng = np.random.default_rng(5)
    u = rng.standard_normal((2, 45, 3)).astype(np.float32)
    skip = rng.standard_normal(3).astype(np.float32)
    x0 = rng.standard_normal((2, 3, 6)).astype(np.float32)
    y, final = companion_ssm(u, a, b, c, skip, initial_state=x0, return_final_state=True)
    # the definition, in float64 NumPy
    x, ys = np.asarray(x0, np.float64), []
    for t in range(45):
        x = np.concatenate([np.zeros_like(x[..., :1]), x[..., :-1]], -1) + a * x[..., -1:] + b * u[:, t, :, None]
        ys.append(np.sum(c * x, -1) + skip * u[:, t])
    assert rel(y, np.stack(ys, 1)) < 1e-5 and rel(final, x) < 1e-5
    # K_0 = c . b multiplies u_t itself: no extra delay
    impulse = np.zeros((1, 4, 3), np.float32)
    impulse[0, 0] = 1.0
    np.testing.assert_allclose(companion_ssm(impulse, a, b, c)[0, 0], np.sum(c * b, -1), rtol=1e-5)


def test_steps_reproduce_the_sequence_and_continue_a_prefill():
    a, b, c = params(6, 2, 5)
    u = np.random.default_rng(7).standard_normal((3, 20, 2)).astype(np.float32)
    full = companion_ssm(u, a, b, c, np.ones(2, np.float32))
    y_pre, state = companion_ssm(u[:, :12], a, b, c, np.ones(2, np.float32), return_final_state=True)
    outs = [y_pre]
    for t in range(12, 20):
        y, state = companion_step(u[:, t], a, b, c, np.ones(2, np.float32), state)
        outs.append(y[:, None])
    assert rel(jnp.concatenate(outs, 1), full) < 1e-5


def test_gradients_flow_through_the_fast_kernel():
    a, b, c = params(8, 2, 6)
    u = np.random.default_rng(9).standard_normal((1, 16, 2)).astype(np.float32)
    grads = {impl: jax.grad(lambda a, b, c: jnp.sum(companion_ssm(u, a, b, c, impl=impl) ** 2), argnums=(0, 1, 2))(
        a, b, c) for impl in ("reference", "fast")}
    for x, y in zip(grads["fast"], grads["reference"]):
        assert rel(x, y) < 1e-4


@pytest.mark.parametrize("call, message", [
    (lambda a, b, c: companion_kernel(a, b[:, :3], c, 8), r"b has shape \(2, 3\), expected \[heads, d\] = \(2, 5\)"),
    (lambda a, b, c: companion_kernel(a, b, c, 0), r"length must be a positive int"),
    (lambda a, b, c: companion_kernel(a, b, c, 8, impl="fft"), r"unknown impl='fft'"),
    (lambda a, b, c: companion_ssm(np.zeros((1, 4, 3)), a, b, c), r"u has shape \(1, 4, 3\), expected \[batch, seq, heads\]"),
    (lambda a, b, c: companion_ssm(np.zeros((1, 4, 2)), a, b, c, np.ones(3)), r"skip has shape \(3,\)"),
])
def test_bad_arguments_are_named(call, message):
    a, b, c = params(10, 2, 5)
    with pytest.raises(ValueError, match=message):
        call(a, b, c)


def test_fast_kernel_with_an_eigenvalue_on_the_unit_circle():
    """a >= 0 with |a|_1 = 1 puts an eigenvalue at exactly 1 (the roots-of-unity formula divides by zero there)."""
    a, b, c = params(11, 2, 6)
    a = np.abs(a) / np.abs(a).sum(-1, keepdims=True)
    for length in (7, 64):
        expected = numpy_kernel(a, b, c, length)
        assert rel(companion_kernel(a, b, c, length, impl="fast"), expected) < 2e-5
