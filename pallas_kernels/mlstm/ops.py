"""Public mLSTM op: shape checks, impl dispatch (chosen per platform at lowering time) and the custom VJP."""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from ..common import on_platform
from . import reference as _ref

IMPLS = ("auto", "reference", "chunked", "pallas")
PALLAS_VARIANTS = ("triton", "tpu")  # kernel bodies: GPU (Triton) and TPU (Mosaic)


def _kernel():
    from . import kernel  # Pallas imports are deferred: reference/chunked users never pay for them

    return kernel


def _shape_error(name: str, got, expected: str) -> ValueError:
    return ValueError(f"mlstm: {name} has shape {tuple(got)}, expected {expected}")


def _check_inputs(q, k, v, i, f, initial_state, chunk_size, eps, impl):
    if impl not in IMPLS:
        raise ValueError(f"mlstm: unknown impl={impl!r}; expected one of {IMPLS}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"mlstm: chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(eps, numbers.Real) or eps < 0:
        raise ValueError(f"mlstm: eps must be a non-negative number, got {eps!r}")
    if q.ndim != 4:
        raise _shape_error("q", q.shape, "[batch, seq, heads, d_qk] (rank 4)")
    b, s, h, dk = q.shape
    if k.shape != q.shape:
        raise _shape_error("k", k.shape, f"[batch, seq, heads, d_qk] = {tuple(q.shape)} (same as q)")
    if v.ndim != 4 or v.shape[:3] != (b, s, h):
        raise _shape_error("v", v.shape, f"[batch, seq, heads, d_v] = ({b}, {s}, {h}, d_v)")
    for name, gate in (("i_preact", i), ("f_preact", f)):
        if gate.shape != (b, s, h):
            raise _shape_error(name, gate.shape, f"[batch, seq, heads] = {(b, s, h)}")
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 3:
            raise ValueError("mlstm: initial_state must be a tuple (C [batch, heads, d_qk, d_v], n [batch, heads, "
                             "d_qk], m [batch, heads])")
        expected = ((b, h, dk, v.shape[-1]), (b, h, dk), (b, h))
        for name, x, shape in zip(("C", "n", "m"), initial_state, expected):
            if jnp.shape(x) != shape:
                raise _shape_error(f"initial_state {name}", jnp.shape(x), str(list(shape)))
    for name, x in (("q", q), ("k", k), ("v", v), ("i_preact", i), ("f_preact", f)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"mlstm: {name} must be a floating array, got dtype {x.dtype}")


# --------------------------------------------------------------------------------------------------------------
# dispatch: chunked jnp on CPU for "auto", Pallas (Triton on GPU, Mosaic on TPU, the interpreter on CPU)
# --------------------------------------------------------------------------------------------------------------


def _chunked_fwd(q, k, v, i, f, c0, n0, m0, *, chunk, eps):
    return _ref.chunked(q, k, v, i, f, (c0, n0, m0), chunk, eps)


def _chunked_bwd(q, k, v, i, f, c0, n0, m0, dh, dc, dn, *, chunk, eps):
    def fwd(q, k, v, i, f, c0, n0):
        h, (c, n, _) = _ref.chunked(q, k, v, i, f, (c0, n0, m0), chunk, eps)
        return h, c, n

    (h, c, n), pullback = jax.vjp(fwd, q, k, v, i, f, c0, n0)
    return pullback((dh.astype(h.dtype), dc.astype(c.dtype), dn.astype(n.dtype)))  # bf16 inputs give an f32 h


# The kernels tile both head dims (any d_v; xLSTM 7B's 256 x 512 heads included), so "auto" runs them for every
# head size on TPU, and on GPU up to this d_qk: the Triton parallel kernels hold whole (chunk, d_qk) blocks of q
# and k, which outgrow an H100's shared memory above 512 (measured: 1024 asks for 259 KB of the 227 KB). Wider
# d_qk on GPU takes the chunked jnp form under "auto"; impl="pallas" always uses the kernels.
AUTO_TRITON_MAX_D_QK = 512


def _h_in_dtype_of_v(fn, *args):
    h, state = fn(*args)
    return h.astype(args[2].dtype), state  # the op casts h to this dtype anyway


def _dispatch(kind: str, impl, chunk, eps, pallas_variant, *args):
    jnp_fn = functools.partial(_chunked_fwd if kind == "fwd" else _chunked_bwd, chunk=chunk, eps=eps)
    if impl == "chunked":
        return jnp_fn(*args)
    if kind == "fwd":  # on_platform's branches must agree on types: h in v's dtype, as the kernels return it
        jnp_fn = functools.partial(_h_in_dtype_of_v, jnp_fn)
    kernel = _kernel()
    kernel_fn = functools.partial(kernel.mlstm_fwd if kind == "fwd" else kernel.mlstm_bwd, chunk=chunk, eps=eps)
    d_qk = args[0].shape[-1]

    def lowered(body):  # the function of one kernel body ("triton": CUDA/ROCm, "tpu": Mosaic)
        if impl == "auto" and body == "triton" and d_qk > AUTO_TRITON_MAX_D_QK:
            return jnp_fn
        return functools.partial(kernel_fn, platform=body, interpret=False)

    interpreted = functools.partial(kernel_fn, platform=pallas_variant or "triton", interpret=True)
    cpu_fn = interpreted if impl == "pallas" else jnp_fn  # "auto": the chunked jnp form on CPU
    return on_platform(args, kernel=lowered, cpu=cpu_fn, variant=pallas_variant)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _mlstm(q, k, v, i, f, c0, n0, m0, impl, chunk, eps, pallas_variant):
    return _dispatch("fwd", impl, chunk, eps, pallas_variant, q, k, v, i, f, c0, n0, m0)


def _mlstm_fwd(q, k, v, i, f, c0, n0, m0, impl, chunk, eps, pallas_variant):
    out = _dispatch("fwd", impl, chunk, eps, pallas_variant, q, k, v, i, f, c0, n0, m0)
    return out, (q, k, v, i, f, c0, n0, m0)  # inputs only: the backward recomputes the chunk states


def _mlstm_bwd(impl, chunk, eps, pallas_variant, res, cts):
    q, k, v, i, f, c0, n0, m0 = res
    dh, (dc, dn, _) = cts  # the final m is wrapped in stop_gradient by the public op
    grads = _dispatch("bwd", impl, chunk, eps, pallas_variant, q, k, v, i, f, c0, n0, m0, dh, dc, dn)
    return (*grads, jnp.zeros_like(m0))  # m0 is wrapped in stop_gradient by the public op


_mlstm.defvjp(_mlstm_fwd, _mlstm_bwd)


def mlstm(q, k, v, i_preact, f_preact, *, initial_state=None, return_final_state: bool = False,
          chunk_size: int = 64, eps: float = 1e-6, impl: str = "auto", pallas_variant: str | None = None):
    """The mLSTM cell of xLSTM over a sequence (causal; matrix memory with exponential input gates).

    Per batch row and head, with q scaled by d_qk**-0.5, forget gate exp(logsigmoid(f)), input gate exp(i)
    and the max stabiliser m (log space):
        m_t = max(log f_t + m_{t-1}, i_t)
        C_t = exp(log f_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T,   n_t likewise with k_t
        h_t = q_t C_t / (max(|q_t . n_t|, exp(-m_t)) + eps)
    from (C, n, m) = initial_state, or zeros (as the authors' chunkwise/recurrent kernels and transformers'
    xLSTM start).

    Args:
      q, k: [batch, seq, heads, d_qk]; v: [batch, seq, heads, d_v] (d_v may differ from d_qk); any seq length.
      i_preact, f_preact: gate pre-activations [batch, seq, heads] (soft-capping belongs to the layer).
      initial_state: optional (C [batch, heads, d_qk, d_v], n [batch, heads, d_qk], m [batch, heads]), e.g. from a
        prefill. Gradients flow to C and n; m is a stabiliser and is not differentiated (stop_gradient).
      return_final_state: also return the state after the last token (float32; float64 for float64 inputs).
      chunk_size: chunk length of the chunked / Pallas forms; results do not depend on it beyond rounding.
      eps: added to the normaliser.
      impl: "reference" (exact O(S^2) stabilised quadratic form with the initial-state column), "chunked"
        (jnp: `lax.scan` over chunk states + parallel intra-chunk outputs), "pallas" (Pallas kernels: Triton on
        GPU, Mosaic on TPU, the interpreter on CPU) or "auto" (Pallas on GPU/TPU, chunked on CPU; chosen when
        lowering, so AOT lowering for another platform emits that platform's kernels). The kernels tile the head
        dims; "auto" keeps the chunked form only on GPU for d_qk above AUTO_TRITON_MAX_D_QK (512).
      pallas_variant: None (by platform) or force "triton" / "tpu" kernel bodies (tests run both on CPU).

    Returns:
      h [batch, seq, heads, d_v] in the inputs' dtype, or (h, (C, n, m)) when return_final_state.
    """
    q, k, v, i, f = (jnp.asarray(x) for x in (q, k, v, i_preact, f_preact))
    _check_inputs(q, k, v, i, f, initial_state, chunk_size, eps, impl)
    if pallas_variant not in (None,) + PALLAS_VARIANTS:
        raise ValueError(f"mlstm: pallas_variant must be None or one of {PALLAS_VARIANTS}, got {pallas_variant!r}")
    dtype = jnp.result_type(q, k, v)
    acc = _ref.acc_dtype(q, k, v, i, f)
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    if initial_state is None:
        c0, n0, m0 = _ref.zero_state(b, h, dk, dv, acc)
    else:
        c0, n0, m0 = (jnp.asarray(x).astype(acc) for x in initial_state)
    m0 = lax.stop_gradient(m0)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B,S,H,...] <-> [B,H,S,...]
    args = (heads_first(q.astype(dtype)), heads_first(k.astype(dtype)), heads_first(v.astype(dtype)),
            heads_first(i.astype(acc)), heads_first(f.astype(acc)))

    if s == 0:
        out, final = jnp.zeros((b, h, 0, dv), dtype), (c0, n0, m0)
    elif impl == "reference":
        out, final = _ref.quadratic(*args, (c0, n0, m0), eps)
    else:
        out, final = _mlstm(*args, c0, n0, m0, impl, int(chunk_size), float(eps), pallas_variant)
    out = heads_first(out).astype(dtype)
    final = (final[0], final[1], lax.stop_gradient(final[2]))
    return (out, final) if return_final_state else out


def mlstm_step(q_BHK, k_BHK, v_BHW, i_BH, f_BH, state=None, eps: float = 1e-6):
    """One decoding step: returns (h_BHW, (C, n, m)). `state=None` starts from zeros (C = n = 0, m = 0).

    Feeding a sequence one token at a time reproduces `mlstm` and its final state.
    """
    q, k, v, i, f = (jnp.asarray(x) for x in (q_BHK, k_BHK, v_BHW, i_BH, f_BH))
    if q.ndim != 3:
        raise _shape_error("q", q.shape, "[batch, heads, d_qk]")
    b, h, dk = q.shape
    if k.shape != q.shape:
        raise _shape_error("k", k.shape, f"{tuple(q.shape)} (as q)")
    if v.ndim != 3 or v.shape[:2] != (b, h):
        raise _shape_error("v", v.shape, f"({b}, {h}, d_v)")
    for name, gate in (("i", i), ("f", f)):
        if gate.shape != (b, h):
            raise _shape_error(name, gate.shape, f"({b}, {h})")
    acc = _ref.acc_dtype(q, k, v, i, f)
    if state is None:
        state = _ref.zero_state(b, h, dk, v.shape[-1], acc)
    expected = ((b, h, dk, v.shape[-1]), (b, h, dk), (b, h))
    for name, x, shape in zip(("C", "n", "m"), state, expected):
        if jnp.shape(x) != shape:
            raise _shape_error(f"state {name}", jnp.shape(x), str(list(shape)))
    out, new_state = _ref.step(q, k, v, i, f, state, eps)
    return out.astype(jnp.result_type(q, k, v)), new_state
