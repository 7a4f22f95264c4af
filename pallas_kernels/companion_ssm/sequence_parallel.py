"""The companion-matrix SSM over a sequence split across devices: one all-gather of [B, D, d] states per layer.

One SSM per channel (D of them, state size d): A = S + a e_d^T (S e_i = e_{i+1}), x_t = A x_{t-1} + b u_t,
y_t = c . x_t + skip u_t. Inside a `shard_map` where device g holds the contiguous chunk g (length L) of every row:

    y0_t     = sum_{s<=t} K_{t-s} u_s,    K_l = c^T A^l b          the chunk from a zero state (FFT convolution)
    w_t      = sum_{s<=t} H_{t-s} u_s,    H_l = e_d^T A^l b        the state's last entry along it (same FFT of u)
    x_end_i  = sum_{m<i} a_{i-m} w_{L-2-m} + b_{i-m} u_{L-1-m}      the chunk's final state from zero, i = 1..d
    all      = all_gather(x_end)                                   [G, B, D, d]: the only communication
    x_in     = sum_{j<g} A^(L (g-1-j)) x_end_j                     the state entering chunk g
    y_t      = y0_t + skip u_t + sum_{k<d} x_in,{k+1} F_{t+1+k}    plus the free response c^T A^(t+1) x_in

x_end unrolls x_t[i] = x_{t-1}[i-1] + a_i x_{t-1}[d] + b_i u_t (x[0] = 0) i times down the diagonal: it needs
only the last d values of w and u (a truncated polynomial product). The free response uses A^k e_1 = e_{k+1}
(k < d): c^T A^(t+1) e_{k+1} = F_{t+1+k} with F_l = c^T A^l e_1 (l < L + d), i.e. F_l = c_l for l < d and then
the kernel with b = A^d e_1 = a; the sum over k is a d-tap correlation, done by FFT.

A^n acts on states as polynomials (e_{k+1} <-> z^k; A multiplies by z modulo the characteristic polynomial
chi(z) = z^d - sum_i a_i z^(i-1)): A^n v = (z^n mod chi) v(z) mod chi, with z^n mod chi = A^n e_1 by
square-and-multiply. No [L, D, d] array and no d x d matrix per power is formed: memory is O(B L D) for the chunk's
FFTs, O(D L) for the kernels and O(D d^2) for the reduction rows z^(d+k) mod chi (as in the fast kernel).

What crosses devices is (G - 1) B D d accumulator-dtype numbers received per device and layer, whatever L. The
backward is autodiff's: the all-gather transposes to a reduce-scatter (the reverse prefix of state gradients).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.sequence_parallel import chunk_index, earlier_chunks, gather_chunks

from . import reference as _ref
from .ops import companion_kernel


def _fft_size(n: int) -> int:
    """A power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


def _poly_product(p, q):
    """Coefficients [..., 2d] of p(z) q(z) for coefficient vectors [..., d] (an FFT of size 2d: no wrap-around)."""
    n = 2 * p.shape[-1]
    return jnp.fft.irfft(jnp.fft.rfft(p, n) * jnp.fft.rfft(q, n), n).astype(p.dtype)


def reduction_rows(a_DX):
    """[D, d-1, d]: z^(d+k) mod chi for k = 0 .. d-2 (z^d = a, then multiplied by z, i.e. A applied, each time)."""
    d = a_DX.shape[-1]
    _, rows_KDX = lax.scan(lambda row, _: (_ref.apply_companion(a_DX, row), row), a_DX, None, length=d - 1)
    return jnp.swapaxes(rows_KDX, 0, 1)


def _reduce(prod, rows_DKX):
    """A polynomial [..., D, >= d] of degree < 2d - 1 modulo chi: its low part plus high coefficients times rows."""
    d = rows_DKX.shape[-1]
    high = prod[..., d:2 * d - 1]
    return prod[..., :d] + jnp.einsum("...dk,dkx->...dx", high, rows_DKX, precision=lax.Precision.HIGHEST)


def _mulmod(p, q, rows_DKX):
    return _reduce(_poly_product(p, q), rows_DKX)


def power_of_a(a_DX, n: int, rows_DKX=None):
    """[D, d]: A^n e_1, i.e. z^n mod chi, by square-and-multiply (O(d^2 log n) per channel)."""
    rows = reduction_rows(a_DX) if rows_DKX is None else rows_DKX
    one = jnp.zeros_like(a_DX).at[:, 0].set(1.0)
    result = one
    for bit in bin(n)[2:]:  # from the most significant bit: z^(2m) = (z^m)^2, z^(2m+1) = z z^(2m)
        result = _mulmod(result, result, rows)
        if bit == "1":
            result = _ref.apply_companion(a_DX, result)
    return result


def chunk_kernels(a, b, c, length: int, impl: str = "auto"):
    """(K [D, L], H [D, L], F [D, L + d]): K_l = c^T A^l b (the output), H_l = e_d^T A^l b (the state's last entry),
    F_l = c^T A^l e_1 (the free response). F_l = c_l for l < d and c^T A^(l-d) a after (A^d e_1 = a), so all three
    come from one `companion_kernel` call of length L on the stacked triples (b, b, a) and (c, e_d, c). (Asking the
    fast kernel for F with b = e_1 directly lost accuracy in float32: 2e-5 near its end on a growing A, vs 4e-7.)"""
    h, d = a.shape
    last = jnp.zeros_like(a).at[:, d - 1].set(1.0)
    k3 = companion_kernel(jnp.concatenate([a, a, a]), jnp.concatenate([b, b, a]), jnp.concatenate([c, last, c]),
                          length, impl=impl)
    return k3[:h], k3[h:2 * h], jnp.concatenate([c, k3[2 * h:]], axis=1)


def convolve_chunk(u_BLD, k_DL, h_DL):
    """(y0 [B, L, D], w [B, L, D]): the causal convolutions of u with K and with H, sharing u's FFT."""
    length = u_BLD.shape[1]
    n = _fft_size(2 * length)
    u_f = jnp.fft.rfft(u_BLD, n, axis=1)
    y0, w = (jnp.fft.irfft(u_f * jnp.fft.rfft(kern.T, n, axis=0)[None], n, axis=1)[:, :length].astype(u_BLD.dtype)
             for kern in (k_DL, h_DL))
    return y0, w


def _last_reversed(x_BLD, d: int, shift: int):
    """[B, D, d]: x_{L-1-shift-m} for m = 0 .. d-1 (zero before the chunk)."""
    length = x_BLD.shape[1]
    kept = x_BLD[:, :length - shift]
    padded = jnp.concatenate([jnp.zeros((x_BLD.shape[0], d, x_BLD.shape[2]), x_BLD.dtype), kept], axis=1)
    return jnp.swapaxes(jnp.flip(padded[:, -d:], axis=1), 1, 2)


def state_from_tails(u_BLD, w_BLD, a, b):
    """x_end [B, D, d] from the chunk's inputs and its state's last entry w: x_end_i = sum_{m<i} a_{i-m} w_{L-2-m}
    + b_{i-m} u_{L-1-m}, the first d coefficients of a(z) w~(z) + b(z) u~(z) (w~, u~: the reversed tails)."""
    d = a.shape[-1]
    w_tail, u_tail = _last_reversed(w_BLD, d, 1), _last_reversed(u_BLD, d, 0)
    return (_poly_product(a[None], w_tail) + _poly_product(b[None], u_tail))[..., :d]


def chunk_state(u_BLD, a, b, *, impl: str = "auto"):
    """This chunk's final state [B, D, d] from a zero start: sum_s A^(L-1-s) b u_s (acc dtype of a, b)."""
    acc = _ref.acc_dtype(a, b)
    a, b = jnp.asarray(a, acc), jnp.asarray(b, acc)
    u = jnp.asarray(u_BLD).astype(acc)
    d = a.shape[-1]
    last = jnp.zeros_like(a).at[:, d - 1].set(1.0)
    h_DL = companion_kernel(a, b, last, u.shape[1], impl=impl)
    return state_from_tails(u, _ref.causal_conv(u, h_DL), a, b)


def state_entering_chunk(x_GBDX, a, length: int, axis_name: str):
    """sum_{j<g} A^(L (g-1-j)) x_end_j for this device's chunk g (zeros for the first chunk)."""
    count, d = x_GBDX.shape[0], a.shape[-1]
    rows = reduction_rows(a)
    hop_power = power_of_a(a, length, rows)
    powers = [jnp.zeros_like(a).at[:, 0].set(1.0)]  # A^(L m) e_1 for m = 0 .. G-1
    for _ in range(count - 1):
        powers.append(_mulmod(powers[-1], hop_power, rows))
    hops_G = jnp.maximum(chunk_index(axis_name) - 1 - jnp.arange(count), 0)
    weight_GDX = jnp.where(earlier_chunks(count, axis_name)[:, None, None], jnp.stack(powers)[hops_G], 0.0)
    n = 2 * d  # sum_j x_end_j(z) weight_j(z), summed in the frequency domain, then reduced once
    spectrum = jnp.sum(jnp.fft.rfft(x_GBDX, n) * jnp.fft.rfft(weight_GDX, n)[:, None], axis=0)
    return _reduce(jnp.fft.irfft(spectrum, n).astype(x_GBDX.dtype), rows)


def free_response(x_in_BDX, f_DM, length: int):
    """[B, L, D]: c^T A^(t+1) x_in = sum_k x_in,k F_{t+1+k}, a d-tap correlation (the full convolution of the reversed
    state with F, read at t + d)."""
    d = x_in_BDX.shape[-1]
    n = _fft_size(length + 2 * d - 1)
    spectrum = jnp.fft.rfft(jnp.flip(x_in_BDX, -1), n) * jnp.fft.rfft(f_DM, n)[None]
    y_BDL = jnp.fft.irfft(spectrum, n)[..., d:d + length].astype(x_in_BDX.dtype)
    return jnp.swapaxes(y_BDL, 1, 2)


def sharded_companion_ssm(u, a, b, c, skip=None, *, axis_name: str, impl: str = "auto"):
    """`companion_ssm(u, a, b, c, skip)` of the whole sequence, for this device's chunk of it (u: [B, L, D], the
    chunk of every row; a, b, c: [D, d]; skip: [D] or None), the sequence split over mesh axis `axis_name`. Call
    inside a shard_map. impl picks the kernel (`companion_kernel`)."""
    acc = _ref.acc_dtype(a, b, c)
    a, b, c = (jnp.asarray(x, acc) for x in (a, b, c))
    u = jnp.asarray(u)
    if u.ndim != 3 or u.shape[-1] != a.shape[0]:
        raise ValueError(f"sharded_companion_ssm: u has shape {tuple(u.shape)}, expected [batch, chunk, heads] "
                         f"with heads = {a.shape[0]}")
    out_dtype = jnp.result_type(u.dtype, acc)
    u_BLD = u.astype(acc)
    length = u_BLD.shape[1]
    k_DL, h_DL, f_DM = chunk_kernels(a, b, c, length, impl)
    y0_BLD, w_BLD = convolve_chunk(u_BLD, k_DL, h_DL)
    x_GBDX = gather_chunks(state_from_tails(u_BLD, w_BLD, a, b), axis_name)
    x_in_BDX = state_entering_chunk(x_GBDX, a, length, axis_name)
    y_BLD = y0_BLD + free_response(x_in_BDX, f_DM, length)
    if skip is not None:
        y_BLD = y_BLD + jnp.asarray(skip, acc) * u_BLD
    return y_BLD.astype(out_dtype)
