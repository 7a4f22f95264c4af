"""Public companion-SSM ops: the convolution kernel, the SSM over a sequence (FFT convolution), one decoding step.

No Pallas kernel yet: SpaceTime's costs are the kernel (tiny: U x (X + length)) and an FFT convolution that XLA
already runs well; a Pallas kernel (a chunked scan with A^C powers) is to be written only where measurements on a
GPU show it beating `jnp.fft`. The folder keeps the house layout so that it can be added behind `impl=`.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from . import reference as _ref

KERNEL_IMPLS = ("auto", "reference", "krylov", "fast")
_KERNELS = {"reference": _ref.sequential_kernel, "krylov": _ref.krylov_kernel, "fast": _ref.fast_kernel,
            "auto": _ref.fast_kernel}


def _error(name: str, got, expected: str) -> ValueError:
    return ValueError(f"companion_ssm: {name} has shape {tuple(got)}, expected {expected}")


def _check_params(a, b, c, skip=None):
    a, b, c = (jnp.asarray(x) for x in (a, b, c))
    if a.ndim != 2:
        raise _error("a", a.shape, "[heads, d] (the companion matrices' last columns)")
    for name, x in (("b", b), ("c", c)):
        if x.shape != a.shape:
            raise _error(name, x.shape, f"[heads, d] = {tuple(a.shape)} (as a)")
    if skip is not None and jnp.shape(skip) != (a.shape[0],):
        raise _error("skip", jnp.shape(skip), f"[heads] = ({a.shape[0]},)")
    for name, x in (("a", a), ("b", b), ("c", c)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"companion_ssm: {name} must be a floating array, got dtype {x.dtype}")
    acc = _ref.acc_dtype(a, b, c)
    return a.astype(acc), b.astype(acc), c.astype(acc)


def companion_kernel(a, b, c, length: int, *, impl: str = "auto"):
    """K [heads, length] with K_l = c^T A^l b, A = shift + a in the last column (a is used as given: any
    normalisation belongs to the layer).

    impl: "reference" (sequential powers, O(d length)), "krylov" (repeated squaring), "fast" (roots of unity +
    Sherman-Morrison, O((d + length) log), any d including d > length) or "auto" (= fast). float64 parameters
    give a float64 kernel.
    """
    if impl not in KERNEL_IMPLS:
        raise ValueError(f"companion_kernel: unknown impl={impl!r}; expected one of {KERNEL_IMPLS}")
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 1:
        raise ValueError(f"companion_kernel: length must be a positive int, got {length!r}")
    a, b, c = _check_params(a, b, c)
    return _KERNELS[impl](a, b, c, int(length))


def companion_ssm(u, a, b, c, skip=None, *, initial_state=None, return_final_state: bool = False,
                  impl: str = "auto"):
    """The SSM over a sequence: x_t = A x_{t-1} + b u_t, y_t = c . x_t + skip * u_t, x_{-1} = initial_state or 0.

    u: [batch, seq, heads]; a, b, c: [heads, d]; skip: [heads] or None. From a zero state, y is a causal FFT
    convolution with `companion_kernel(..., seq)` (training). With an initial state or when the final state is
    wanted (decoding), the O(seq d) recurrence computes both in one pass. Returns y
    [batch, seq, heads], or (y, final state [batch, heads, d]) when return_final_state (computed by the O(seq d)
    structured recurrence).
    """
    u = jnp.asarray(u)
    a, b, c = _check_params(a, b, c, skip)
    if u.ndim != 3 or u.shape[-1] != a.shape[0]:
        raise _error("u", u.shape, f"[batch, seq, heads] with heads = {a.shape[0]}")
    bsz, s, h = u.shape
    d = a.shape[-1]
    if initial_state is not None and jnp.shape(initial_state) != (bsz, h, d):
        raise _error("initial_state", jnp.shape(initial_state), f"[batch, heads, d] = {(bsz, h, d)}")
    acc = a.dtype
    out_dtype = jnp.result_type(u.dtype, acc)
    if initial_state is not None or return_final_state:
        # Continuing a state (prefill in decoding) or returning one: the O(seq d) recurrence gives both at once.
        skip_h = jnp.zeros((h,), acc) if skip is None else jnp.asarray(skip, acc)
        x0 = None if initial_state is None else jnp.asarray(initial_state, acc)
        y, final = _ref.recurrence(u.astype(acc), a, b, c, skip_h, x0)
        return (y.astype(out_dtype), final) if return_final_state else y.astype(out_dtype)
    if s == 0:
        return u.astype(out_dtype)
    y = _ref.causal_conv(u.astype(acc), companion_kernel(a, b, c, s, impl=impl))
    if skip is not None:
        y = y + jnp.asarray(skip, acc) * u.astype(acc)
    return y.astype(out_dtype)


def companion_step(u_BU, a, b, c, skip=None, state=None):
    """One decoding step: x = A state + b u, y = c . x + skip * u. Returns (y [batch, heads], x [batch, heads, d])."""
    u = jnp.asarray(u_BU)
    a, b, c = _check_params(a, b, c, skip)
    if u.ndim != 2 or u.shape[-1] != a.shape[0]:
        raise _error("u", u.shape, f"[batch, heads] with heads = {a.shape[0]}")
    if state is None:
        state = jnp.zeros((*u.shape, a.shape[-1]), a.dtype)
    if jnp.shape(state) != (*u.shape, a.shape[-1]):
        raise _error("state", jnp.shape(state), f"[batch, heads, d] = {(*u.shape, a.shape[-1])}")
    x = _ref.apply_companion(a[None], jnp.asarray(state, a.dtype)) + b[None] * u.astype(a.dtype)[..., None]
    y = jnp.sum(c[None] * x, axis=-1)
    if skip is not None:
        y = y + jnp.asarray(skip, a.dtype) * u
    return y.astype(jnp.result_type(u.dtype, a.dtype)), x
