"""SpaceTime's building blocks around the companion SSM: preprocessing filters and the closed-loop decoder.

Preprocessing SSMs are companion SSMs with A = S (a = 0), b = e_1 and a fixed c: then K_l = c_l, i.e. a fixed
causal FIR filter with taps c (jaxeff.models.spacetime.Preprocess applies them as causal convolutions).
  differencing of order k: the signed binomial row (order 1: [1, -1]; order 2: [1, -2, 1]; ...)
  moving-average residual of window w: u_t minus the mean of the last w values (taps delta_0 - 1/w on [0, w))
Closed loop (the forecasting decoder): after encoding a lag window into the state x, feed the layer's own
predicted next input k . x back in, i.e. roll x_t = (A + b k^T) x_{t-1} forward; the output is c . x_t.
With A = S, b = e_1, c = e_1 and k = (phi_1, ..., phi_p, 0, ...) this is exactly the AR(p) recursion.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.companion_ssm.reference import apply_companion

MAX_DIFFERENCE_ORDER = 4


def difference_kernel(order: int, length: int | None = None):
    """Taps of k-th order differencing: (-1)^j binomial(k, j), j = 0..k, zero-padded to `length`."""
    if not 0 <= order <= MAX_DIFFERENCE_ORDER:
        raise ValueError(f"difference_kernel: order must be in 0..{MAX_DIFFERENCE_ORDER}, got {order}")
    taps = [(-1) ** j * math.comb(order, j) for j in range(order + 1)]
    length = length or order + 1
    return np.asarray(taps + [0] * (length - len(taps)), np.float32)  # NumPy: a constant, also under jit


def moving_average_residual_kernel(window: int, length: int | None = None):
    """Taps of u_t - mean(u_{t-w+1..t}): 1 - 1/w at lag 0, -1/w at lags 1..w-1 (they sum to 0)."""
    if window < 1:
        raise ValueError(f"moving_average_residual_kernel: window must be >= 1, got {window}")
    length = length or window
    taps = np.zeros((length,), np.float32)
    taps[:window] = -1.0 / window
    taps[0] += 1.0
    return taps


def closed_loop_rollout(x_BDX, a_DX, b_DX, c_DX, k_DX, horizon: int):
    """From the encoded state x, roll x_t = (A + b k^T) x_{t-1} for `horizon` steps (F), one SSM per channel (D).

    Returns (y [B, F, D] = c . x_t, u [B, F, D] = k . x_{t-1}, the predicted inputs).
    """
    def step(x, _):
        u_next = jnp.sum(k_DX * x, axis=-1)
        x = apply_companion(a_DX[None], x) + b_DX[None] * u_next[..., None]
        return x, (jnp.sum(c_DX * x, axis=-1), u_next)

    _, (y_FBD, u_FBD) = jax.lax.scan(step, x_BDX, None, length=horizon)
    return jnp.swapaxes(y_FBD, 0, 1), jnp.swapaxes(u_FBD, 0, 1)
