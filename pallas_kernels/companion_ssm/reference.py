"""Companion-matrix SSM (SpaceTime) in plain jnp: its convolution kernel three ways, FFT convolution, recurrence.

One SSM per kernel (axis U) with state size d (axis X): A = S + a e_d^T, where S is the down-shift
(S e_i = e_{i+1}, ones on the sub-diagonal) and the last column holds the free parameters a; b, c in R^d.

    x_t = A x_{t-1} + b u_t,   y_t = c . x_t (+ skip u_t),   x_{-1} = 0
    => y = K * u (causal convolution) with K_l = c^T A^l b, l = 0 .. length-1 (K_0 = c . b: no extra delay)

Kernels ([U, X] parameters -> [U, length]):
  sequential  l mat-vecs, each O(d) thanks to the structure: A x = shift_down(x) + a x_{d-1}
  krylov      repeated squaring: the Krylov block [b, A b, ..] doubles with A^m, O(d^2 length + d^3 log length)
  fast        generating function on a circle just inside the unit circle (an FFT of size length) with a rank-1
              (Sherman-Morrison) correction of the nilpotent shift, O((d + length) log(d + length)) plus forming
              c^T A^length (O(d^2 log length): x^length modulo the characteristic polynomial)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def acc_dtype(*xs):
    return jnp.float64 if any(jnp.asarray(x).dtype == jnp.float64 for x in xs) else jnp.float32


def companion_matrix(a_UX):
    """[U, X] last columns -> [U, X, X] matrices A = S + a e_d^T."""
    d = a_UX.shape[-1]
    shift = jnp.eye(d, k=-1, dtype=a_UX.dtype)
    return shift[None] + a_UX[:, :, None] * jax.nn.one_hot(d - 1, d, dtype=a_UX.dtype)[None, None, :]


def apply_companion(a, x):
    """A x for a batch of kernels in O(d): shift x down by one and add a times its last entry.

    a, x: [..., U, X], leading axes broadcast (e.g. a [1, U, X] with x [B, U, X])."""
    shifted = jnp.concatenate([jnp.zeros_like(x[..., :1]), x[..., :-1]], axis=-1)
    return shifted + a * x[..., -1:]


def sequential_kernel(a, b, c, length: int):
    """K_l = c^T A^l b by iterating x <- A x from x = b (the definition)."""
    def step(x, _):
        return apply_companion(a, x), jnp.sum(c * x, axis=-1)

    _, k_SU = jax.lax.scan(step, b, None, length=length)
    return k_SU.T


def krylov_kernel(a, b, c, length: int):
    """The Krylov block [b, Ab, ..., A^(n-1) b] by doubling: X_2m = [X_m, A^m X_m], A^2m = (A^m)^2."""
    power = companion_matrix(a)  # A^m for the current block length m
    block = b[:, :, None]  # [U, X, m]
    while block.shape[-1] < length:
        block = jnp.concatenate([block, jnp.einsum("hij,hjm->him", power, block)], axis=-1)
        power = jnp.einsum("hij,hjk->hik", power, power)
    return jnp.einsum("hd,hdl->hl", c, block[:, :, :length])


def _poly_mulmod(p, q, high_rows):
    """(p * q) mod charpoly(A) for coefficient vectors of degree < d; high_rows[k] = x^(d+k) mod charpoly."""
    d = p.shape[-1]
    n = 2 * d - 1  # the product has degree <= 2d - 2: an FFT of this size does not wrap around
    prod = jnp.fft.irfft(jnp.fft.rfft(p, n) * jnp.fft.rfft(q, n), n).astype(p.dtype)
    return prod[..., :d] + jnp.einsum("hk,hkd->hd", prod[..., d:], high_rows, precision=jax.lax.Precision.HIGHEST)


def companion_power_rows(a, c, n: int):
    """c^T A^n for every kernel in O(d^2 log n), using A = multiplication by x modulo its characteristic polynomial.

    In the basis 1, x, .., x^(d-1) (= e_1 .. e_d) the companion matrix multiplies a polynomial by x and reduces it
    with x^d = sum_i a_i x^(i-1). So A^n = r(A) with r = x^n mod charpoly (square-and-multiply on polynomials),
    and c^T A^n = sum_j r_j c^T A^j, whose rows c^T A^j take O(d) each (v^T A = shift_up(v) + (v . a) e_d).
    """
    d = a.shape[-1]
    # x^(d+k) mod charpoly for k = 0..d-2: x^d = a, then multiply by x (= apply A) each time
    _, high = jax.lax.scan(lambda row, _: (apply_companion(a, row), row), a, None, length=d - 1)
    high_rows = jnp.swapaxes(high, 0, 1)  # [U, X-1, X]
    one = jnp.zeros_like(a).at[..., 0].set(1.0)
    result, base, e = one, apply_companion(a, one), n  # base: x mod charpoly
    while e:
        if e & 1:
            result = _poly_mulmod(result, base, high_rows)
        e >>= 1
        if e:
            base = _poly_mulmod(base, base, high_rows)

    def row_times_a(v, _):
        nxt = jnp.concatenate([v[..., 1:], jnp.zeros_like(v[..., :1])], axis=-1)
        return nxt.at[..., -1].add(jnp.sum(v * a, axis=-1)), v

    _, rows = jax.lax.scan(row_times_a, c, None, length=d)  # rows[j] = c^T A^j, [X, U, X]
    return jnp.einsum("hj,jhd->hd", result, rows)


def _cross_correlation(u, w):
    """q_j = sum_i u_{i+j} w_i for j = 0..d-1 (FFT of size 2d, no wrap-around)."""
    d = u.shape[-1]
    n = 2 * d
    q = jnp.fft.irfft(jnp.fft.rfft(u, n) * jnp.conj(jnp.fft.rfft(w, n)), n)
    return q[..., :d]


def _at_contour(coeffs, length: int, radius):
    """Evaluate sum_j p_j z^j at z_k = radius * exp(-2 pi i k / length): scale p_j by radius^j, fold j modulo length
    (z^length = radius^length is then applied per fold), and take an FFT of size length."""
    d = coeffs.shape[-1]
    folds = -(-d // length)
    scaled = coeffs * radius ** jnp.arange(d, dtype=coeffs.dtype)
    padded = jnp.pad(scaled, [(0, 0)] * (coeffs.ndim - 1) + [(0, folds * length - d)])
    return jnp.fft.fft(padded.reshape(*coeffs.shape[:-1], folds, length).sum(-2), axis=-1)


def fast_kernel(a, b, c, length: int):
    """Generating function K^(z) = sum_{l<length} K_l z^l = c~^T (I - zA)^-1 b with c~ = (I - z^length A^length)^T c.

    I - zA = (I - zS) - z a e_d^T; (I - zS)^-1 = sum_{j<d} z^j S^j since S is nilpotent, so with
    Q(u, w)(z) = u^T (I - zS)^-1 w (coefficients: cross-correlations of u and w), Sherman-Morrison gives
        K^(z) = Q(c~, b) + z Q(c~, a) Q(e_d, b) / (1 - z Q(e_d, a)).
    It is evaluated on the circle of radius r = exp(-1/length), not on the unit circle: 1 - z Q(e_d, a) =
    det(I - zA) vanishes where 1/z is an eigenvalue of A, and an L1-normalised a with all entries >= 0 puts an
    eigenvalue exactly at 1. Inside the circle it cannot vanish (|eigenvalues| <= 1); the inverse FFT then gives
    K_l r^l, and dividing by r^l (at most e) recovers K. Any d and length (coefficients fold modulo length).
    """
    d = a.shape[-1]
    radius = jnp.exp(-1.0 / length).astype(a.dtype)
    c_tilde = c - radius**length * companion_power_rows(a, c, length)
    e_d = jnp.zeros_like(a).at[:, d - 1].set(1.0)
    q_cb, q_ca = _cross_correlation(c_tilde, b), _cross_correlation(c_tilde, a)
    q_eb, q_ea = _cross_correlation(e_d, b), _cross_correlation(e_d, a)
    z = radius * jnp.exp(-2j * jnp.pi * jnp.arange(length) / length).astype(jnp.result_type(1j, a.dtype))
    cb, ca, eb, ea = (_at_contour(q, length, radius) for q in (q_cb, q_ca, q_eb, q_ea))
    k_hat = cb + z * ca * eb / (1.0 - z * ea)
    k_scaled = jnp.fft.ifft(k_hat, axis=-1).real
    return (k_scaled / radius ** jnp.arange(length, dtype=a.dtype)).astype(a.dtype)


def causal_conv(u_BSU, k_US):
    """y_t = sum_{l <= t} k_l u_{t-l} per kernel, by FFT (zero-padded to a power of two >= 2S)."""
    s = u_BSU.shape[1]
    n = 1 << (2 * s - 1).bit_length()
    y = jnp.fft.irfft(jnp.fft.rfft(u_BSU, n, axis=1) * jnp.fft.rfft(k_US.T, n, axis=0)[None], n, axis=1)
    return y[:, :s].astype(u_BSU.dtype)


def recurrence(u_BSU, a, b, c, skip, state=None):
    """The SSM run step by step (the definition): returns (y [B,S,U], final state [B,U,X])."""
    bsz, _, h = u_BSU.shape
    x0 = jnp.zeros((bsz, h, a.shape[-1]), u_BSU.dtype) if state is None else state

    def step(x, u_BU):
        x = apply_companion(a[None], x) + b[None] * u_BU[..., None]
        return x, jnp.sum(c[None] * x, axis=-1) + skip * u_BU

    final, y_SBU = jax.lax.scan(step, x0, jnp.swapaxes(u_BSU, 0, 1))
    return jnp.swapaxes(y_SBU, 0, 1), final
