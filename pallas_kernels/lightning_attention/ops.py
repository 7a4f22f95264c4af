"""Public lightning attention op: shape checks, impl dispatch and the custom VJP."""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from ..common import MIN_DIM, next_pow2, on_platform, pad_dim
from . import kernel as _kernel
from . import reference as _ref

IMPLS = ("auto", "reference", "chunked", "pallas")


def _shape_error(name: str, got, expected: str) -> ValueError:
    return ValueError(f"lightning_attention: {name} has shape {tuple(got)}, expected {expected}")


def _check_inputs(q, k, v, rate, initial_state, block_size, impl):
    if impl not in IMPLS:
        raise ValueError(f"lightning_attention: unknown impl={impl!r}; expected one of {IMPLS}")
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
        raise ValueError(f"lightning_attention: block_size must be a positive int, got {block_size!r}")
    if q.ndim != 4:
        raise _shape_error("q", q.shape, "[batch, seq, heads, d_k] (rank 4)")
    b, s, h, dk = q.shape
    if k.shape != q.shape:
        raise _shape_error("k", k.shape, f"[batch, seq, heads, d_k] = {tuple(q.shape)} (same as q)")
    if v.ndim != 4 or v.shape[:3] != (b, s, h):
        raise _shape_error("v", v.shape, f"[batch, seq, heads, d_v] = ({b}, {s}, {h}, d_v) (batch/seq/heads of q)")
    if rate.shape != (h,):
        raise _shape_error("rate", rate.shape, f"[heads] = ({h},)")
    if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
        raise _shape_error(
            "initial_state", initial_state.shape, f"[batch, heads, d_k, d_v] = {(b, h, dk, v.shape[-1])}"
        )
    for name, x in (("q", q), ("k", k), ("v", v), ("rate", rate)) + (
        (("initial_state", initial_state),) if initial_state is not None else ()
    ):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"lightning_attention: {name} must be a floating array, got dtype {x.dtype}")


# --------------------------------------------------------------------------------------------------------------
# Pallas path: layout [B, S, H, K or W] <-> kernel rows [B*H, Sp, Kp or Wp]
# --------------------------------------------------------------------------------------------------------------


def _pallas_block(block_size: int, seq: int) -> int:
    # Power of two (Triton) and >= 16; no bigger than the (power-of-two-rounded) sequence, to not waste work.
    return max(MIN_DIM, min(next_pow2(block_size), next_pow2(seq)))


def _to_rows(x, sp: int, dp: int, dtype=None):
    """[B, S, H, K or W] -> [B*H, Sp, dp] (zero padded)."""
    b, s, h, d = x.shape
    x = x.transpose(0, 2, 1, 3).reshape(b * h, s, d)
    if dtype is not None:
        x = x.astype(dtype)
    return jnp.pad(x, ((0, 0), (0, sp - s), (0, dp - d)))


def _from_rows(x, b: int, s: int, h: int, d: int):
    """[B*H, Sp, Kp or Wp] -> [B, S, H, K or W] (K or W = d)."""
    return x[:, :s, :d].reshape(b, h, s, d).transpose(0, 2, 1, 3)


def _state_rows(s_BHKW, kp: int, vp: int):
    b, h, dk, dv = s_BHKW.shape
    return jnp.pad(s_BHKW.reshape(b * h, dk, dv).astype(jnp.float32), ((0, 0), (0, kp - dk), (0, vp - dv)))


def _rate_rows(rate_H, b: int):
    return jnp.broadcast_to(rate_H.astype(jnp.float32)[None, :], (b, rate_H.shape[0])).reshape(-1, 1, 1)


def _pallas_fwd(q, k, v, rate, s0, *, block_size: int, variant: str, interpret: bool):
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    blk = _pallas_block(block_size, s)
    sp, kp, vp = -(-s // blk) * blk, pad_dim(dk, variant), pad_dim(dv, variant)
    o, st = _kernel.lightning_fwd(
        _to_rows(q, sp, kp), _to_rows(k, sp, kp), _to_rows(v, sp, vp), _rate_rows(rate, b), _state_rows(s0, kp, vp),
        seq_len=s, blk=blk, platform=variant, interpret=interpret,
    )
    st = st[:, :dk, :dv].reshape(b, h, dk, dv)
    return _from_rows(o, b, s, h, dv).astype(q.dtype), st.astype(s0.dtype)


def _pallas_bwd(q, k, v, rate, s0, do, dst, *, block_size: int, variant: str, interpret: bool):
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    blk = _pallas_block(block_size, s)
    sp, kp, vp = -(-s // blk) * blk, pad_dim(dk, variant), pad_dim(dv, variant)
    dq, dk_, dv_, ds0 = _kernel.lightning_bwd(
        _to_rows(q, sp, kp), _to_rows(k, sp, kp), _to_rows(v, sp, vp), _rate_rows(rate, b), _state_rows(s0, kp, vp),
        _to_rows(do, sp, vp, v.dtype), _state_rows(dst, kp, vp),
        seq_len=s, blk=blk, platform=variant, interpret=interpret,
    )
    # dq, dk: [d_v tiles, B*H, Sp, Kp], one partial per tile of the backward kernels' d_v axis.
    dq, dk_ = (x[0] if x.shape[0] == 1 else jnp.sum(x, axis=0) for x in (dq, dk_))
    return (
        _from_rows(dq, b, s, h, dk).astype(q.dtype),
        _from_rows(dk_, b, s, h, dk).astype(k.dtype),
        _from_rows(dv_, b, s, h, dv).astype(v.dtype),
        ds0[:, :dk, :dv].reshape(b, h, dk, dv).astype(s0.dtype),
    )


def _dispatch_fwd(impl, block_size, pallas_variant, q, k, v, rate, s0):
    def chunked_fn(q, k, v, rate, s0):
        return _ref.chunked_attention_fwd(q, k, v, rate, s0, block_size)

    if impl == "chunked":
        return chunked_fn(q, k, v, rate, s0)
    interp = functools.partial(_pallas_fwd, block_size=block_size, variant=pallas_variant or "triton", interpret=True)
    cpu_fn = interp if impl == "pallas" else chunked_fn  # "auto": chunked jnp on CPU
    kernel = lambda body: functools.partial(_pallas_fwd, block_size=block_size, variant=body, interpret=False)
    return on_platform((q, k, v, rate, s0), kernel=kernel, cpu=cpu_fn, variant=pallas_variant)


def _dispatch_bwd(impl, block_size, pallas_variant, q, k, v, rate, s0, do, dst):
    def chunked_fn(q, k, v, rate, s0, do, dst):
        return _ref.chunked_attention_bwd(q, k, v, rate, s0, do, dst, block_size)

    if impl == "chunked":
        return chunked_fn(q, k, v, rate, s0, do, dst)
    interp = functools.partial(_pallas_bwd, block_size=block_size, variant=pallas_variant or "triton", interpret=True)
    cpu_fn = interp if impl == "pallas" else chunked_fn  # "auto": chunked jnp on CPU
    kernel = lambda body: functools.partial(_pallas_bwd, block_size=block_size, variant=body, interpret=False)
    return on_platform((q, k, v, rate, s0, do, dst), kernel=kernel, cpu=cpu_fn, variant=pallas_variant)


# --------------------------------------------------------------------------------------------------------------
# custom VJP shared by "chunked", "pallas" and "auto"
# --------------------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _lightning(q, k, v, rate, s0, impl, block_size, pallas_variant):
    return _dispatch_fwd(impl, block_size, pallas_variant, q, k, v, rate, s0)


def _lightning_fwd(q, k, v, rate, s0, impl, block_size, pallas_variant):
    out = _dispatch_fwd(impl, block_size, pallas_variant, q, k, v, rate, s0)
    return out, (q, k, v, rate, s0)  # O(n d) residuals; states are recomputed in the backward sweeps


def _lightning_bwd(impl, block_size, pallas_variant, res, cts):
    q, k, v, rate, s0 = res
    do, dst = cts
    dq, dk, dv, ds0 = _dispatch_bwd(impl, block_size, pallas_variant, q, k, v, rate, s0, do.astype(q.dtype), dst)
    # rate is wrapped in stop_gradient by the public op, so this zero is the true cotangent there.
    return dq, dk, dv, jnp.zeros_like(rate), ds0


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def lightning_attention(
    q,
    k,
    v,
    rate,
    *,
    initial_state=None,
    return_final_state: bool = False,
    block_size: int = 64,
    impl: str = "auto",
    pallas_variant: str | None = None,
):
    """Causal linear attention with a per-head scalar decay (TransNormerLLM's Lightning Attention-2).

    Per batch row and head, with lam = exp(-rate[h]):
        kv_t = lam * kv_{t-1} + k_t^T v_t,   kv_{-1} = initial_state (zeros if None)
        o_t  = q_t kv_t
    No 1/sqrt(d) scaling and no normaliser are applied (TNL normalises the output afterwards).

    Args:
      q, k: [batch, seq, heads, d_k] (q_BSHK, k_BSHK); v: [batch, seq, heads, d_v]. Any seq length (block
        padding never changes outputs or the final state). They are promoted to a common dtype.
      rate: [heads], positive; per-step decay exp(-rate). **Not differentiable**: it is wrapped in
        `lax.stop_gradient` for every impl (rate is a fixed schedule in TransNormerLLM, not learned), so its
        gradient is always exactly zero. Gradients flow to q, k, v and initial_state.
      initial_state: optional [batch, heads, d_k, d_v] state to continue from (e.g. a prefill).
      return_final_state: also return the state after the last token, [batch, heads, d_k, d_v] in float32
        (float64 for float64 inputs).
      block_size: sequence block of the chunked/Pallas forms. The Pallas kernels round it up to a power of
        two >= 16 (Triton/TPU tile rules) and cap it at the sequence length rounded up to a power of two;
        a kernel uses a smaller block (and splits d_v into tiles) where one program would not fit the chip's
        shared memory / VMEM, e.g. for wide LRPE heads (kernel.fwd_tiles / bwd_tiles). Results do not depend
        on either beyond float rounding.
      impl: "reference" (O(n^2) masked form, plain autodiff), "chunked" (Lightning Attention-2 in jnp with
        `lax.scan` and a hand-written backward), "pallas" (Pallas kernels: Triton on GPU, Mosaic on TPU, the
        interpreter on CPU) or "auto" (Pallas on GPU/TPU, chunked on CPU). "pallas"/"auto" choose the platform
        branch at lowering time (`lax.platform_dependent`), so AOT lowering for another platform works.
      pallas_variant: None (by platform) or force the kernel variant, "triton" (in-kernel block loop) or
        "tpu" (sequential grid axis + VMEM scratch); on CPU the forced variant runs in the interpreter. For tests.

    Returns:
      o [batch, seq, heads, d_v] in the inputs' dtype, or (o, final_state) when return_final_state.
    Arithmetic and the state are float32 (float64 for float64 inputs in reference/chunked; the Pallas kernels
    always use float32).
    """
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    rate = jnp.asarray(rate)
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state)
    _check_inputs(q, k, v, rate, initial_state, block_size, impl)
    if pallas_variant not in (None,) + _kernel.PLATFORMS:
        raise ValueError(f"lightning_attention: pallas_variant must be None or one of {_kernel.PLATFORMS}, "
                         f"got {pallas_variant!r}")
    dtype = jnp.result_type(q, k, v)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    acc = _ref.acc_dtype(dtype)
    rate = lax.stop_gradient(rate.astype(acc))
    b, s, h, dk = q.shape
    dv = v.shape[-1]
    s0 = jnp.zeros((b, h, dk, dv), acc) if initial_state is None else initial_state.astype(acc)

    if s == 0:
        o, st = jnp.zeros((b, 0, h, dv), dtype), s0
    elif impl == "reference":
        o, st = _ref.quadratic_attention(q, k, v, rate, s0)
    else:
        o, st = _lightning(q, k, v, rate, s0, impl, min(int(block_size), s), pallas_variant)
    return (o, st) if return_final_state else o


def lightning_attention_step(q_BHK, k_BHK, v_BHW, rate_H, state_BHKW=None):
    """One decoding step of lightning_attention: returns (o_BHW, new_state_BHKW).

    new_state = exp(-rate) * state + k^T v;  o = q new_state. `state_BHKW=None` starts from zeros. Feeding the
    tokens of a sequence one at a time reproduces lightning_attention (and its final state). rate is not
    differentiated (stop_gradient), as in lightning_attention.
    """
    q, k, v, rate = (jnp.asarray(x) for x in (q_BHK, k_BHK, v_BHW, rate_H))
    if q.ndim != 3:
        raise ValueError(f"lightning_attention_step: q has shape {tuple(q.shape)}, expected [batch, heads, d_k]")
    b, h, dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"lightning_attention_step: k has shape {tuple(k.shape)}, expected {tuple(q.shape)} (as q)")
    if v.ndim != 3 or v.shape[:2] != (b, h):
        raise ValueError(f"lightning_attention_step: v has shape {tuple(v.shape)}, expected ({b}, {h}, d_v)")
    if rate.shape != (h,):
        raise ValueError(f"lightning_attention_step: rate has shape {tuple(rate.shape)}, expected ({h},)")
    dv = v.shape[-1]
    dtype = jnp.result_type(q, k, v)
    acc = _ref.acc_dtype(dtype)
    if state_BHKW is None:
        state_BHKW = jnp.zeros((b, h, dk, dv), acc)
    state = jnp.asarray(state_BHKW)
    if state.shape != (b, h, dk, dv):
        raise ValueError(
            f"lightning_attention_step: state has shape {tuple(state.shape)}, expected {(b, h, dk, dv)}"
        )
    return _ref.recurrent_step(
        q.astype(dtype), k.astype(dtype), v.astype(dtype), lax.stop_gradient(rate.astype(acc)), state
    )
