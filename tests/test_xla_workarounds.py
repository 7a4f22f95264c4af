"""XLA miscompilations jaxeff works around (jaxeff/xla_workarounds.py): jit must equal eager."""

import jax
import jax.numpy as jnp
import numpy as np

import jaxeff  # noqa: F401  (applies the work-arounds; conftest imports nothing from JAX before)
from jaxeff.layers.spacetime import closed_loop_rollout


def test_broadcast_parameter_reduction_is_compiled_correctly():
    # jaxlib 0.10.2 XLA:CPU gave errors of ~80 on values of ~30 here without the work-around.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 64, 32)), jnp.float32)
    b, k = (jnp.asarray(rng.normal(size=(64, 32)), jnp.float32) for _ in range(2))

    def rank_one_update(x, b, k):
        return x + b * jnp.sum(k * x, -1, keepdims=True)

    np.testing.assert_allclose(jax.jit(rank_one_update)(x, b, k), rank_one_update(x, b, k), rtol=1e-5, atol=1e-4)


def test_closed_loop_rollout_jit_equals_float64_numpy():
    rng = np.random.default_rng(1)
    bsz, h, d, horizon = 32, 64, 32, 8
    x0 = rng.normal(size=(bsz, h, d))
    a, b, c, k = (rng.normal(size=(h, d)) * s for s in (0.03, 0.3, 0.3, 0.3))
    x, expected = x0.copy(), []
    for _ in range(horizon):
        u = np.sum(k * x, -1, keepdims=True)
        x = np.concatenate([np.zeros_like(x[..., :1]), x[..., :-1]], -1) + a * x[..., -1:] + b * u
        expected.append(np.sum(c * x, -1))
    f32 = [jnp.asarray(v, jnp.float32) for v in (x0, a, b, c, k)]
    y, _ = jax.jit(closed_loop_rollout, static_argnums=5)(*f32, horizon)
    np.testing.assert_allclose(y, np.stack(expected, 1), rtol=1e-4, atol=1e-4)
