"""Public InfLLM v2 op: the block selection (not differentiated), then attention over the selected blocks by one of
three impls chosen per platform at lowering time; the custom VJP around the Pallas kernels."""

from __future__ import annotations

import functools

import jax

from ..common import on_platform
from . import reference as _ref

IMPLS = ("auto", "reference", "xla", "pallas")


def _kernel():
    from . import kernel  # Pallas imports only when a Pallas path is traced

    return kernel


def _check(q, k, v, block_size: int, kernel_size: int, kernel_stride: int, impl: str):
    if impl not in IMPLS:
        raise ValueError(f"infllm_attention: unknown impl={impl!r}; expected one of {IMPLS}")
    if q.ndim != 4:
        raise ValueError(f"infllm_attention: q has shape {q.shape}, expected [batch, seq, heads, head_dim]")
    for name, x in (("k", k), ("v", v)):
        if x.ndim != 4 or x.shape[:2] != q.shape[:2] or x.shape[3] != q.shape[3]:
            raise ValueError(f"infllm_attention: {name} has shape {x.shape}, expected [batch, seq, kv_heads, "
                             f"head_dim] = [{q.shape[0]}, {q.shape[1]}, kv_heads, {q.shape[3]}]")
    if k.shape[2] != v.shape[2] or q.shape[2] % k.shape[2]:
        raise ValueError(f"infllm_attention: {q.shape[2]} query heads need a whole number per KV head; k has "
                         f"{k.shape[2]} and v {v.shape[2]} heads")
    for name, value in (("block_size", block_size), ("kernel_size", kernel_size), ("kernel_stride", kernel_stride)):
        if value < 1:
            raise ValueError(f"infllm_attention: {name} must be >= 1, got {value}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _pallas(q, k, v, mask, block_size, scale, platform, interpret):
    return _pallas_fwd(q, k, v, mask, block_size, scale, platform, interpret)[0]


def _pallas_fwd(q, k, v, mask, block_size, scale, platform, interpret):
    out, lse = _kernel().infllm_forward(q, k, v, mask, block_size=block_size, scale=scale, platform=platform,
                                        interpret=interpret)
    return out, (q, k, v, mask, out, lse)


def _pallas_bwd(block_size, scale, platform, interpret, res, d_out):
    q, k, v, mask, out, lse = res
    dq, dk, dv = _kernel().infllm_backward(q, k, v, out, lse, d_out, mask, block_size=block_size, scale=scale,
                                           platform=platform, interpret=interpret)
    return dq, dk, dv, None  # the selection is indices: no gradient


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def selection(q, k, *, block_size: int = 64, kernel_size: int = 32, kernel_stride: int = 16, init_blocks: int = 1,
              local_blocks: int = 32, topk: int = 64, dense_len: int = 0, scale: float | None = None):
    """bool [B, G, S, J]: the KV blocks each query of each KV head attends (reference.infllm_mask)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _ref.infllm_mask(q, k, kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size,
                            init_blocks=init_blocks, local_blocks=local_blocks, topk=topk, scale=scale,
                            dense_len=dense_len)


def infllm_attention(q, k, v, *, block_size: int = 64, kernel_size: int = 32, kernel_stride: int = 16,
                     init_blocks: int = 1, local_blocks: int = 32, topk: int = 64, dense_len: int = 0,
                     impl: str = "auto", scale: float | None = None, mask=None):
    """Causal InfLLM v2 sparse attention (no parameters of its own).

    q [B, S, H, K]; k, v [B, S, G, K] (grouped-query: a group's query heads share the selection). Each query keeps
    the first `init_blocks` blocks, the last `local_blocks` blocks up to its own, and the `topk - init_blocks`
    other causal blocks with the highest pooled-key score (`selection`); a query whose context (its position + 1)
    is shorter than `dense_len` reads every causal block. `mask` overrides the selection
    (bool [B, G, S, J]). impl: "reference" (dense attention under the token mask), "xla" (the same, one query
    block at a time), "pallas" (block-sparse kernels over the blocks each query block's tokens chose, forward and
    backward; the interpreter on CPU; block_size a power of two >= 16), "auto" (Pallas on GPU/TPU, xla on CPU).
    """
    _check(q, k, v, block_size, kernel_size, kernel_stride, impl)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if mask is None:
        mask = selection(q, k, block_size=block_size, kernel_size=kernel_size, kernel_stride=kernel_stride,
                         init_blocks=init_blocks, local_blocks=local_blocks, topk=topk, dense_len=dense_len,
                         scale=scale)
    mask = jax.lax.stop_gradient(mask)
    s = q.shape[1]

    def reference():
        return _ref.dense_attention(q, k, v, _ref.token_mask(mask, block_size, s), scale)

    def xla():
        return _ref.chunked_attention(q, k, v, mask, block_size, scale)

    def pallas(platform: str, interpret: bool = False):
        return _pallas(q, k, v, mask, block_size, scale, platform, interpret)

    def on_device(cpu):  # the kernel body of the platform being lowered for (Triton on GPU, Mosaic on TPU)
        return on_platform((), kernel=lambda body: lambda: pallas(body), cpu=cpu)

    pallas_ok = block_size >= 16 and block_size & (block_size - 1) == 0
    if impl == "pallas" and not pallas_ok:
        raise ValueError(f"infllm_attention: impl='pallas' needs a block_size that is a power of two >= 16 (one "
                         f"kernel tile per block), got {block_size}; use impl='xla' or change the block size")
    if impl == "reference":
        return reference()
    if impl == "xla" or (impl == "auto" and not pallas_ok):
        return xla()
    if impl == "pallas":
        return on_device(cpu=lambda: pallas("triton", interpret=True))
    return on_device(cpu=xla)
