"""SpaceTime pieces: preprocessing filters, the closed loop = the AR recursion, and an AR(4) fit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff.layers.spacetime import closed_loop_rollout, difference_kernel, moving_average_residual_kernel
from jaxeff.models.spacetime import Preprocess, preprocessing_taps
from pallas_kernels.companion_ssm import companion_ssm

PHI = np.array([0.5, -0.3, 0.2, 0.1])


def preprocess(u_BLD, difference_orders=(), ma_windows=()):
    """The model's fixed preprocessing filters (filter i on channel i mod n_filters); no parameters."""
    taps_UX = preprocessing_taps(list(difference_orders), list(ma_windows))
    return np.asarray(Preprocess(taps_UX).apply({}, jnp.asarray(u_BLD)))


def ar_series(n: int, phi=PHI, sigma=0.1, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros(n + 100)
    for t in range(len(phi), len(x)):
        x[t] = np.dot(phi, x[t - len(phi):t][::-1]) + sigma * rng.standard_normal()
    return x[100:]


def test_difference_kernels_are_signed_binomials_and_remove_polynomial_trends():
    assert difference_kernel(1).tolist() == [1, -1]
    assert difference_kernel(4).tolist() == [1, -4, 6, -4, 1]
    t = np.arange(30, dtype=np.float32)
    assert difference_kernel(2, 5).tolist() == [1, -2, 1, 0, 0]
    u = np.stack([3 * t + 1, 0.5 * t**2 - t, t**3 / 50], -1)[None]  # linear, quadratic, cubic trends
    y = preprocess(u, difference_orders=(1, 2, 3))[0]  # order c + 1 on channel c
    for c, constant in enumerate((3.0, 1.0, 6 / 50)):
        np.testing.assert_allclose(y[c + 1:, c], constant, rtol=1e-3, atol=1e-3)  # after the warm-up taps
    with pytest.raises(ValueError, match="order must be in 0..4"):
        difference_kernel(5)


def test_moving_average_residual_kernel():
    taps = moving_average_residual_kernel(4, 6)
    np.testing.assert_allclose(taps, [0.75, -0.25, -0.25, -0.25, 0, 0])
    assert abs(float(taps.sum())) < 1e-7
    u = np.full((1, 12, 1), 2.5, np.float32)  # a constant is removed once the window is full
    y = preprocess(u, ma_windows=(4,))
    np.testing.assert_allclose(y[0, 3:, 0], 0.0, atol=1e-6)
    rng = np.random.default_rng(1)
    v = rng.standard_normal((1, 12, 1)).astype(np.float32)
    expected = [v[0, t, 0] - v[0, max(0, t - 3):t + 1, 0].sum() / 4 for t in range(12)]
    np.testing.assert_allclose(preprocess(v, ma_windows=(4,))[0, :, 0], expected, rtol=1e-5, atol=1e-6)


def test_closed_loop_rollout_is_the_ar_recursion():
    d, horizon = 8, 30
    history = ar_series(40)
    a = jnp.zeros((1, d))
    e1 = jnp.zeros((1, d)).at[0, 0].set(1.0)
    k = jnp.zeros((1, d)).at[0, :4].set(PHI)
    _, x = companion_ssm(jnp.asarray(history, jnp.float32)[None, :, None], a, e1, e1, return_final_state=True)
    y, u_pred = closed_loop_rollout(x, a, e1, e1, k, horizon)
    recursion = list(history)
    for _ in range(horizon):
        recursion.append(float(np.dot(PHI, recursion[-4:][::-1])))
    np.testing.assert_allclose(y[0, :, 0], recursion[40:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u_pred, y, rtol=1e-6)  # the next input is the forecast itself here


def test_an_open_loop_companion_ssm_learns_ar4_coefficients():
    """One-step prediction with A = S, b = e_1: the output weights c become phi (within 0.05), the rest ~ 0."""
    series = jnp.asarray(ar_series(4000), jnp.float32)
    u, target = series[None, :-1, None], series[1:]
    d = 8
    a = jnp.zeros((1, d))
    e1 = jnp.zeros((1, d)).at[0, 0].set(1.0)

    def loss(c):
        return jnp.mean((companion_ssm(u, a, e1, c)[0, :, 0] - target) ** 2)

    opt = optax.adam(0.05)
    c = jnp.zeros((1, d))
    state = opt.init(c)

    @jax.jit
    def step(c, state):
        grads = jax.grad(loss)(c)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(c, updates), state

    for _ in range(300):
        c, state = step(c, state)
    np.testing.assert_allclose(c[0, :4], PHI, atol=0.05)
    np.testing.assert_allclose(c[0, 4:], 0.0, atol=0.05)
