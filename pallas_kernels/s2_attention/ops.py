"""Public S2-Attention op: shape and pattern checks, impl dispatch (chosen per platform at lowering time), the
custom VJP around the Pallas kernels, and the log-sum-exp for merging KV partitions."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ..common import on_platform
from . import reference as _ref

IMPLS = ("auto", "reference", "xla", "pallas")


def _kernel():
    from . import kernel  # Pallas imports only when a Pallas path is traced

    return kernel


def _check(q, k, v, block_size: int, impl: str):
    if impl not in IMPLS:
        raise ValueError(f"s2_attention: unknown impl={impl!r}; expected one of {IMPLS}")
    if q.ndim != 4:
        raise ValueError(f"s2_attention: q has shape {q.shape}, expected [batch, seq, heads, head_dim]")
    for name, x in (("k", k), ("v", v)):
        if x.ndim != 4 or x.shape[:2] != q.shape[:2] or x.shape[3] != q.shape[3]:
            raise ValueError(f"s2_attention: {name} has shape {x.shape}, expected [batch, seq, kv_heads, head_dim] "
                             f"= [{q.shape[0]}, {q.shape[1]}, kv_heads, {q.shape[3]}]")
    if k.shape[2] != v.shape[2] or q.shape[2] % k.shape[2]:
        raise ValueError(f"s2_attention: {q.shape[2]} query heads need a whole number of query heads per KV head; "
                         f"k has {k.shape[2]} and v {v.shape[2]} heads")
    if block_size < 1:
        raise ValueError(f"s2_attention: block_size must be >= 1, got {block_size}")


def pattern(q_shape, kv_heads: int, *, block_size: int, local_blocks: int, vert_stride: int | None,
            head_sliding_step: int | None = None, head_offset: int = 0, num_dense_heads: int = 0,
            sink_blocks: int = 0) -> np.ndarray:
    """The block mask [kv_heads, blocks, blocks] that `s2_attention` uses for queries of shape `q_shape`."""
    blocks = math.ceil(q_shape[1] / block_size)
    return _ref.block_mask(kv_heads, blocks, blocks, local_blocks=local_blocks, vert_stride=vert_stride,
                           head_sliding_step=head_sliding_step, head_offset=head_offset,
                           num_dense_heads=num_dense_heads, sink_blocks=sink_blocks, num_q_heads=q_shape[2])


# ---------------------------------------------------------------------------------------------- Pallas + VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _pallas(q, k, v, mask_key, block_size, scale, platform, interpret):
    return _pallas_fwd(q, k, v, mask_key, block_size, scale, platform, interpret)[0]


def _layouts(mask_key):
    """(kv_index, kv_count, q_index, q_count): the pattern as padded CSR (KV blocks per query block) and its
    transpose (query blocks per KV block, for dK / dV)."""
    mask = np.frombuffer(mask_key[0], bool).reshape(mask_key[1])
    return (*_ref.padded_csr(mask), *_ref.padded_csr(np.swapaxes(mask, 1, 2)))


def _pallas_fwd(q, k, v, mask_key, block_size, scale, platform, interpret):
    kv_index, kv_count, _, _ = _layouts(mask_key)
    out, lse = _kernel().s2_forward(q, k, v, jnp.asarray(kv_index), jnp.asarray(kv_count), block_size=block_size,
                                    scale=scale, platform=platform, interpret=interpret)
    return (out, lse), (q, k, v, out, lse)


def _pallas_bwd(mask_key, block_size, scale, platform, interpret, res, cts):
    q, k, v, out, lse = res
    d_out, _ = cts  # the lse output is for merging partitions; its cotangent is not propagated (documented)
    kv_index, kv_count, q_index, q_count = _layouts(mask_key)
    return _kernel().s2_backward(q, k, v, out, lse, d_out, jnp.asarray(kv_index), jnp.asarray(kv_count),
                                 jnp.asarray(q_index), jnp.asarray(q_count), block_size=block_size, scale=scale,
                                 platform=platform, interpret=interpret)


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


# ---------------------------------------------------------------------------------------------- the op


def s2_attention(q, k, v, *, block_size: int = 64, local_blocks: int, vert_stride: int | None,
                 head_sliding_step: int | None = None, head_offset: int = 0, num_dense_heads: int = 0,
                 sink_blocks: int = 0, impl: str = "auto", return_lse: bool = False, scale: float | None = None):
    """Causal block-sparse attention with S2's per-head strided pattern (`reference.block_mask`).

    q [batch, seq, heads, d]; k, v [batch, seq, kv_heads, d] (grouped-query: the pattern is per KV head);
    scale 1/sqrt(d) by default. impl: "reference" (dense attention with the expanded mask), "xla" (gathers only
    the kept KV blocks), "pallas" (block-sparse flash-attention kernels, forward and backward; the interpreter
    on CPU; block_size a power of two >= 16), "auto" (Pallas on GPU/TPU, xla on CPU; chosen when lowering; xla
    wherever the block size does not suit the kernels). With return_lse, also the
    log-sum-exp [batch, heads, seq] (float32) for merging partial results over KV partitions
    (`reference.merge_partitions`); gradients flow through `out` only.
    """
    _check(q, k, v, block_size, impl)
    mask = pattern(q.shape, k.shape[2], block_size=block_size, local_blocks=local_blocks, vert_stride=vert_stride,
                   head_sliding_step=head_sliding_step, head_offset=head_offset, num_dense_heads=num_dense_heads,
                   sink_blocks=sink_blocks)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    s = q.shape[1]

    def reference():
        return _ref.dense_attention(q, k, v, _ref.expand_to_tokens(mask, s, block_size), scale)

    def xla():
        return _ref.gather_attention(q, k, v, mask, block_size, scale)

    mask_key = (np.ascontiguousarray(mask).tobytes(), mask.shape)

    def pallas(platform: str, interpret: bool = False):
        return _pallas(q, k, v, mask_key, block_size, scale, platform, interpret)

    def on_device(cpu):  # the kernel body of the platform being lowered for (Triton on GPU, Mosaic on TPU)
        return on_platform((), kernel=lambda body: lambda: pallas(body), cpu=cpu)

    pallas_ok = block_size >= 16 and block_size & (block_size - 1) == 0
    if impl == "pallas" and not pallas_ok:
        raise ValueError(f"s2_attention: impl='pallas' needs a block_size that is a power of two >= 16 (one kernel tile "
                         f"per block), got {block_size}; use impl='xla' or change the block size")
    if impl == "reference":
        out, lse = reference()
    elif impl == "xla":
        out, lse = xla()
    elif impl == "pallas":
        out, lse = on_device(cpu=lambda: pallas("triton", interpret=True))
    elif pallas_ok:
        out, lse = on_device(cpu=xla)
    else:  # the kernels cannot tile this block size: the gather form everywhere
        out, lse = xla()
    return (out, lse) if return_lse else out
