"""Pallas kernels for S2-Attention (DKernel-style block-sparse causal attention), forward and backward.

The sparsity is block-level and per KV head (shared by the query heads of a GQA group): query block i of KV head
g attends only the KV blocks in its CSR column list, and the kernels visit only those blocks (no work, and no
K/V traffic, for the blocks a head drops). FlashAttention-2 numerics: online softmax in the forward, P
recomputed from q, k and the saved log-sum-exp in the backward, delta = rowsum(dout * out).

Public functions take the layout q [B, S, H, K], k [B, S, G, K], v [B, S, G, W] (W = K here; H = G * R,
query head h reads KV head h // R) and pad inside; the kernels see rows (flattened (batch, head) pairs):
    q, out, dout: [B*H, Sp, Kp]     k, v: [B*G, Sp, Kp]     lse, delta: [B*H, Sp, 1] f32 (columns)
    the dK/dV kernels view q, dout, lse, delta as [B*G, R*Sp, .] (the R query heads of a KV head back to back;
    a free reshape, since query row b*H + g*R + r = (b*G + g)*R + r)
Sp is S padded to a multiple of the block (zeros; padded keys are masked, padded queries are dropped and carry
zero dout, so they add nothing to dK/dV); Kp is K padded with zeros to a power of two >= 16 (Triton arrays and
tl.dot; above 128 on TPU: a multiple of 128). The scale is applied to the f32 scores, never folded into q.
Index arrays (see csr_from_mask / csc_from_mask): kv_index [G, I, J] (+ kv_count [G, I]) per query block, its
last axis the kept KV blocks (padded to the largest count, m_len); q_index [G, J, I] (+ q_count) per KV block (the
CSC transpose); ids increasing, padded by repeating the last.

Kernels (each has a "triton" body and a "tpu" body):
  forward  fwd:  grid (B*H, I)        -> out, lse           online softmax over the kept KV blocks of the q block
  backward dq:   grid (B*H, I)        -> dq                 dq  = scale * sum_j dS_ij K_j
           dkdv: grid (B*G, J)        -> dk, dv             dk  = scale * sum_{r, i} dS_ij^T Q_i,
                                                            dv  = sum_{r, i} P_ij^T dO_i, over the R query heads r
                                                            of the group and the q blocks i that keep KV block j
  with S_ij = scale * Q_i K_j^T (masked: key <= query on the diagonal block, key < S), P = exp(S - lse),
  dS = P * (dO V^T - delta).
* "triton" (GPU; also runs in the CPU interpreter): the index row of a program arrives through an ordinary
  BlockSpec (padded to a power-of-two length), the count is loaded in-kernel, and a `fori_loop` over the valid
  entries slices K/V (or Q/dO/lse/delta) blocks with pl.ds(id * block, block) from full-sequence BlockSpecs, as
  the upstream Pallas GPU attention does. No grid axis carries state (Triton runs grid points concurrently).
* "tpu" (Mosaic): splash-attention style. kv_index/kv_count (or q_index/q_count) are flattened and passed as
  scalar-prefetch operands (SMEM) of a pltpu.PrefetchScalarGridSpec; a third grid axis of size m_len (R*m_len for dK/dV)
  is "arbitrary", its BlockSpec index_maps read the block id from SMEM, entries >= count are skipped with pl.when
  (their id repeats the last valid one, so the pipeline re-uses the resident block and issues no DMA), and the
  running max / sum / accumulators live in float32 VMEM scratch.
All matmuls accumulate in float32; float32 operands use HIGHEST precision; bfloat16 P / dS are cast back to the
input dtype before their matmuls (as FlashAttention does).

Limitations: one sparse block = one kernel tile (no merging of query blocks / splitting of KV blocks as DKernel's
block_m / block_n do); Triton needs a power-of-two block_size >= 16, TPU a multiple of 16 (128 or more for
speed); the mask is evaluated (iota compare) on every visited block, not only the diagonal one; untuned: no GPU
or TPU was available, only interpret-mode runs and cuda/tpu lowering were checked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..common import (F32, MIN_DIM, PAR, PLATFORMS, SEQ, check_platform,
                      compiler_params, dot as _dot, next_pow2 as _next_pow2, pad_dim as _pad_dim, sds)



# --------------------------------------------------------------------------------------------------------------
# In-kernel math (arrays in, arrays out; shared by both bodies)
# --------------------------------------------------------------------------------------------------------------


def _mask(i, j, bs: int, seq_len: int):
    """(bs, bs) bool: key position <= query position (only binds on the diagonal block) and key < seq_len."""
    qpos = i * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 0)
    kpos = j * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 1)
    return (kpos <= qpos) & (kpos < seq_len)


def _fwd_init(bs: int, dp: int):
    return jnp.full((bs, 1), -jnp.inf, F32), jnp.zeros((bs, 1), F32), jnp.zeros((bs, dp), F32)


def _fwd_step(q, k, v, mask, m, l, acc, scale: float):
    """One KV block of the online softmax. m, l: (bs, 1) running max and sum; acc: (bs, Kp) f32."""
    s = jnp.where(mask, _dot(q, k, 1, 1) * scale, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with no key yet: keep exp() finite
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe)  # masked entries: exp(-inf) = 0
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + _dot(p.astype(v.dtype), v, 1, 0)
    return m_new, l, acc


def _fwd_finish(m, l, acc):
    """(out f32, lse (bs, 1)). A row that attended nothing gets out 0 and lse -inf."""
    out = acc / jnp.where(l == 0.0, 1.0, l)
    return out, m + jnp.log(l)


def _bwd_p_ds(q, k, v, do, lse, delta, mask, scale: float):
    """Recomputed probabilities P and score gradients dS (bs, bs) f32 of one (q block, KV block) pair."""
    s = _dot(q, k, 1, 1) * scale
    p = jnp.where(mask, jnp.exp(s - lse), 0.0)
    ds = p * (_dot(do, v, 1, 1) - delta)
    return p, ds


def _dq_step(q, k, v, do, lse, delta, mask, scale: float):
    _, ds = _bwd_p_ds(q, k, v, do, lse, delta, mask, scale)
    return _dot(ds.astype(k.dtype), k, 1, 0) * scale


def _dkdv_step(q, k, v, do, lse, delta, mask, scale: float):
    p, ds = _bwd_p_ds(q, k, v, do, lse, delta, mask, scale)
    dk = _dot(ds.astype(q.dtype), q, 0, 0) * scale
    dv = _dot(p.astype(do.dtype), do, 0, 0)
    return dk, dv


# --------------------------------------------------------------------------------------------------------------
# Kernel bodies
# --------------------------------------------------------------------------------------------------------------


def _div(a, b: int):
    """a // b for non-negative int32 scalars. lax.div/rem truncate, which needs no sign fix-up (jnp's floor
    division emits `sign`, which Mosaic cannot lower without a TPU to query)."""
    return lax.div(a, b)


def _rem(a, b: int):
    return lax.rem(a, b)


def _blk(j, bs: int):
    return pl.ds(pl.multiple_of(j * bs, bs), bs)


# ---- "triton": index row as an ordinary input, fori_loop over the valid entries, full-sequence K/V refs ------


def _fwd_kernel_loop(idx_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, bs, scale, seq_len):
    i = pl.program_id(1)
    q = q_ref[...]

    def body(t, carry):
        j = idx_ref[t]
        rows = _blk(j, bs)
        return _fwd_step(q, k_ref[rows, :], v_ref[rows, :], _mask(i, j, bs, seq_len), *carry, scale)

    out, lse = _fwd_finish(*lax.fori_loop(0, cnt_ref[0], body, _fwd_init(bs, q.shape[-1])))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel_loop(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, *, bs, scale,
                    seq_len):
    i = pl.program_id(1)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], dl_ref[...]

    def body(t, dq):
        j = idx_ref[t]
        rows = _blk(j, bs)
        return dq + _dq_step(q, k_ref[rows, :], v_ref[rows, :], do, lse, delta, _mask(i, j, bs, seq_len), scale)

    dq = lax.fori_loop(0, cnt_ref[0], body, jnp.zeros(q.shape, F32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel_loop(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, *, bs, scale,
                      seq_len, groups, sp):
    j = pl.program_id(1)
    k, v = k_ref[...], v_ref[...]
    count = cnt_ref[0]

    def head(r, carry):  # the query heads of the group sit back to back along the (R*Sp) axis
        def body(t, carry):
            dk, dv = carry
            i = idx_ref[t]
            rows = pl.ds(pl.multiple_of(r * sp + i * bs, bs), bs)
            ddk, ddv = _dkdv_step(q_ref[rows, :], k, v, do_ref[rows, :], lse_ref[rows, :], dl_ref[rows, :],
                                  _mask(i, j, bs, seq_len), scale)
            return dk + ddk, dv + ddv

        return lax.fori_loop(0, count, body, carry)

    zeros = jnp.zeros(k.shape, F32)
    dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---- "tpu": scalar-prefetched indices drive the index_maps, an "arbitrary" axis over the entries --------------


def _fwd_kernel_grid(idx_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, bs, scale,
                     seq_len, nq, m_len, group_of):
    n, i, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = group_of(n) * nq + i

    @pl.when(t == 0)
    def _init():
        m_scr[...], l_scr[...], acc_scr[...] = _fwd_init(bs, acc_scr.shape[-1])

    @pl.when(t < cnt_ref[row])
    def _step():
        j = idx_ref[row * m_len + t]
        m, l, acc = _fwd_step(q_ref[...], k_ref[...], v_ref[...], _mask(i, j, bs, seq_len), m_scr[...],
                              l_scr[...], acc_scr[...], scale)
        m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

    @pl.when(t == m_len - 1)
    def _done():
        out, lse = _fwd_finish(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _dq_kernel_grid(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, dq_scr, *, bs, scale,
                    seq_len, nq, m_len, group_of):
    n, i, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = group_of(n) * nq + i

    @pl.when(t == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, F32)

    @pl.when(t < cnt_ref[row])
    def _step():
        j = idx_ref[row * m_len + t]
        dq_scr[...] += _dq_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], dl_ref[...],
                                _mask(i, j, bs, seq_len), scale)

    @pl.when(t == m_len - 1)
    def _done():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkdv_kernel_grid(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, dk_scr,
                      dv_scr, *, bs, scale, seq_len, nk, m_len, groups, hkv):
    n, j, u = pl.program_id(0), pl.program_id(1), pl.program_id(2)  # u = r * m_len + t (query head r of the group)
    row = _rem(n, hkv) * nk + j
    t = _rem(u, m_len)

    @pl.when(u == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, F32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, F32)

    @pl.when(t < cnt_ref[row])
    def _step():
        i = idx_ref[row * m_len + t]
        dk, dv = _dkdv_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], dl_ref[...],
                            _mask(i, j, bs, seq_len), scale)
        dk_scr[...] += dk
        dv_scr[...] += dv

    @pl.when(u == groups * m_len - 1)
    def _done():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------------------------
# pallas_call wrappers (kernel layout)
# --------------------------------------------------------------------------------------------------------------


class _Dims:
    """Static sizes: B*hq query rows, B*hkv KV rows, r = hq // hkv query heads per KV head (R), padded Sp / Kp,
    nq query blocks (I)."""

    def __init__(self, b, s, hq, hkv, d, bs, platform):
        self.b, self.s, self.hq, self.hkv, self.d, self.bs = b, s, hq, hkv, d, bs
        self.r = hq // hkv
        self.nq = -(-s // bs)
        self.sp = self.nq * bs
        self.dp = _pad_dim(d, platform)

    def kv_row(self, n):  # query row b*H + h -> KV row b*G + h // R
        return _div(n, self.hq) * self.hkv + self.group(n)

    def group(self, n):  # query row -> KV head index g (row of the index arrays)
        return _div(_rem(n, self.hq), self.r)


def _fwd_call(q, k, v, idx, cnt, dm: _Dims, *, scale, platform, interpret):
    """out [B*H, Sp, Kp] in q.dtype, lse [B*H, Sp, 1] f32."""
    nrows, bs, dp, sp, nq = dm.b * dm.hq, dm.bs, dm.dp, dm.sp, dm.nq
    out_shape = (sds((nrows, sp, dp), q.dtype), sds((nrows, sp, 1)))
    kw = dict(bs=bs, scale=scale, seq_len=dm.s)
    params = compiler_params(platform, interpret, (PAR, PAR, SEQ), bs * dp)
    if platform == "triton":
        m = idx.shape[-1]
        return pl.pallas_call(
            functools.partial(_fwd_kernel_loop, **kw), out_shape=out_shape, grid=(nrows, nq),
            in_specs=[pl.BlockSpec((None, None, m), lambda n, i: (dm.group(n), i, 0)),
                      pl.BlockSpec((None, None, 1), lambda n, i: (dm.group(n), i, 0)),
                      pl.BlockSpec((None, bs, dp), lambda n, i: (n, i, 0)),
                      pl.BlockSpec((None, sp, dp), lambda n, i: (dm.kv_row(n), 0, 0)),
                      pl.BlockSpec((None, sp, dp), lambda n, i: (dm.kv_row(n), 0, 0))],
            out_specs=[pl.BlockSpec((None, bs, dp), lambda n, i: (n, i, 0)),
                       pl.BlockSpec((None, bs, 1), lambda n, i: (n, i, 0))],
            compiler_params=params, interpret=interpret, name="s2_fwd",
        )(idx, cnt, q, k, v)
    m = idx.shape[-1]
    idx_flat, cnt_flat = idx.reshape(-1), cnt.reshape(-1)
    kv_map = lambda n, i, t, ix, c: (dm.kv_row(n), ix[(dm.group(n) * nq + i) * m + t], 0)  # noqa: E731
    own = lambda n, i, t, ix, c: (n, i, 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(nrows, nq, m),
        in_specs=[pl.BlockSpec((None, bs, dp), own), pl.BlockSpec((None, bs, dp), kv_map),
                  pl.BlockSpec((None, bs, dp), kv_map)],
        out_specs=[pl.BlockSpec((None, bs, dp), own), pl.BlockSpec((None, bs, 1), own)],
        scratch_shapes=[pltpu.VMEM((bs, 1), F32), pltpu.VMEM((bs, 1), F32), pltpu.VMEM((bs, dp), F32)])
    return pl.pallas_call(
        functools.partial(_fwd_kernel_grid, nq=nq, m_len=m, group_of=dm.group, **kw), out_shape=out_shape,
        grid_spec=grid_spec, compiler_params=params, interpret=interpret, name="s2_fwd",
    )(idx_flat, cnt_flat, q, k, v)


def _dq_call(q, k, v, do, lse, delta, idx, cnt, dm: _Dims, *, scale, platform, interpret):
    """dq [B*H, Sp, Kp] in q.dtype."""
    nrows, bs, dp, sp, nq = dm.b * dm.hq, dm.bs, dm.dp, dm.sp, dm.nq
    out_shape = sds((nrows, sp, dp), q.dtype)
    kw = dict(bs=bs, scale=scale, seq_len=dm.s)
    params = compiler_params(platform, interpret, (PAR, PAR, SEQ), bs * dp)
    m = idx.shape[-1]
    if platform == "triton":
        own = lambda w: pl.BlockSpec((None, bs, w), lambda n, i: (n, i, 0))  # noqa: E731
        full_kv = pl.BlockSpec((None, sp, dp), lambda n, i: (dm.kv_row(n), 0, 0))
        return pl.pallas_call(
            functools.partial(_dq_kernel_loop, **kw), out_shape=out_shape, grid=(nrows, nq),
            in_specs=[pl.BlockSpec((None, None, m), lambda n, i: (dm.group(n), i, 0)),
                      pl.BlockSpec((None, None, 1), lambda n, i: (dm.group(n), i, 0)),
                      own(dp), full_kv, full_kv, own(dp), own(1), own(1)],
            out_specs=own(dp), compiler_params=params, interpret=interpret, name="s2_bwd_dq",
        )(idx, cnt, q, k, v, do, lse, delta)
    kv_map = lambda n, i, t, ix, c: (dm.kv_row(n), ix[(dm.group(n) * nq + i) * m + t], 0)  # noqa: E731
    own = lambda w: pl.BlockSpec((None, bs, w), lambda n, i, t, ix, c: (n, i, 0))  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(nrows, nq, m),
        in_specs=[own(dp), pl.BlockSpec((None, bs, dp), kv_map), pl.BlockSpec((None, bs, dp), kv_map), own(dp),
                  own(1), own(1)],
        out_specs=own(dp), scratch_shapes=[pltpu.VMEM((bs, dp), F32)])
    return pl.pallas_call(
        functools.partial(_dq_kernel_grid, nq=nq, m_len=m, group_of=dm.group, **kw), out_shape=out_shape,
        grid_spec=grid_spec, compiler_params=params, interpret=interpret, name="s2_bwd_dq",
    )(idx.reshape(-1), cnt.reshape(-1), q, k, v, do, lse, delta)


def _dkdv_call(qg, k, v, dog, lseg, deltag, idx, cnt, dm: _Dims, *, scale, platform, interpret):
    """dk, dv [B*G, Sp, Kp] in k/v dtypes. qg, dog: [B*G, R*Sp, Kp]; lseg, deltag: [B*G, R*Sp, 1]."""
    nrows, bs, dp, sp, nk, r = dm.b * dm.hkv, dm.bs, dm.dp, dm.sp, dm.nq, dm.r
    out_shape = (sds((nrows, sp, dp), k.dtype), sds((nrows, sp, dp), v.dtype))
    kw = dict(bs=bs, scale=scale, seq_len=dm.s)
    params = compiler_params(platform, interpret, (PAR, PAR, SEQ), bs * dp)
    m = idx.shape[-1]
    hkv = dm.hkv
    if platform == "triton":
        own = pl.BlockSpec((None, bs, dp), lambda n, j: (n, j, 0))
        full = lambda w: pl.BlockSpec((None, r * sp, w), lambda n, j: (n, 0, 0))  # noqa: E731
        return pl.pallas_call(
            functools.partial(_dkdv_kernel_loop, groups=r, sp=sp, **kw), out_shape=out_shape, grid=(nrows, nk),
            in_specs=[pl.BlockSpec((None, None, m), lambda n, j: (_rem(n, hkv), j, 0)),
                      pl.BlockSpec((None, None, 1), lambda n, j: (_rem(n, hkv), j, 0)),
                      full(dp), own, own, full(dp), full(1), full(1)],
            out_specs=[own, own], compiler_params=params, interpret=interpret, name="s2_bwd_dkdv",
        )(idx, cnt, qg, k, v, dog, lseg, deltag)

    def q_map(n, j, u, ix, c):  # query head r = u // m_len of the group; its q block id from the CSC list
        return n, _div(u, m) * nk + ix[(_rem(n, hkv) * nk + j) * m + _rem(u, m)], 0

    own = pl.BlockSpec((None, bs, dp), lambda n, j, u, ix, c: (n, j, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(nrows, nk, r * m),
        in_specs=[pl.BlockSpec((None, bs, dp), q_map), own, own, pl.BlockSpec((None, bs, dp), q_map),
                  pl.BlockSpec((None, bs, 1), q_map), pl.BlockSpec((None, bs, 1), q_map)],
        out_specs=[own, own], scratch_shapes=[pltpu.VMEM((bs, dp), F32), pltpu.VMEM((bs, dp), F32)])
    return pl.pallas_call(
        functools.partial(_dkdv_kernel_grid, nk=nk, m_len=m, groups=r, hkv=hkv, **kw), out_shape=out_shape,
        grid_spec=grid_spec, compiler_params=params, interpret=interpret, name="s2_bwd_dkdv",
    )(idx.reshape(-1), cnt.reshape(-1), qg, k, v, dog, lseg, deltag)


# --------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------


def _check_block(block_size: int, platform: str):
    bs = int(block_size)
    if platform == "triton" and (bs < MIN_DIM or bs & (bs - 1)):
        raise ValueError(f"the triton body needs a power-of-two block_size >= {MIN_DIM}, got {block_size!r}")
    if platform == "tpu" and (bs < MIN_DIM or bs % MIN_DIM):
        raise ValueError(f"the tpu body needs a block_size that is a multiple of {MIN_DIM}, got {block_size!r}")
    return bs


def _dims(q, k, v, block_size, platform) -> _Dims:
    check_platform(platform)
    bs = _check_block(block_size, platform)
    b, s, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"k and v must be [B, S, Hkv, D] matching q {q.shape}; got {k.shape}, {v.shape}")
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    return _Dims(b, s, hq, hkv, d, bs, platform)


def _index_args(index, count, heads: int, nblocks: int, platform: str, name: str):
    """Validated int32 index [G, I, J] (or the CSC [G, J, I]) and count [G, I, 1]. For Triton, the last axis is
    padded to a power of two (the row is a kernel array) by repeating the last column (never read: the loops stop
    at count)."""
    index, count = jnp.asarray(index, jnp.int32), jnp.asarray(count, jnp.int32)
    if index.ndim != 3 or index.shape[:2] != (heads, nblocks) or count.shape != (heads, nblocks):
        raise ValueError(f"{name}: expected index [{heads}, {nblocks}, M] and count [{heads}, {nblocks}], got "
                         f"{index.shape} and {count.shape}")
    m = index.shape[-1]
    if platform == "triton" and _next_pow2(m) != m:
        index = jnp.concatenate([index, jnp.repeat(index[..., -1:], _next_pow2(m) - m, axis=-1)], axis=-1)
    return index, count.reshape(heads, nblocks, 1)


def _to_rows(x, dm: _Dims, width: int):
    """[B, S, H or G, K] -> [B*(H or G), Sp, width] (zero padded)."""
    b, s, h, d = x.shape
    x = jnp.transpose(x, (0, 2, 1, 3))
    return jnp.pad(x, ((0, 0), (0, 0), (0, dm.sp - s), (0, width - d))).reshape(b * h, dm.sp, width)


def _from_rows(x, dm: _Dims, heads: int):
    """[B*(H or G), Sp, Kp] -> [B, S, H or G, K]."""
    return jnp.transpose(x[:, :dm.s, :dm.d].reshape(dm.b, heads, dm.s, dm.d), (0, 2, 1, 3))


def _col_rows(x_BHS, dm: _Dims):
    """[B, H, S] -> [B*H, Sp, 1] f32 (zero padded)."""
    x = jnp.pad(x_BHS.astype(F32), ((0, 0), (0, 0), (0, dm.sp - dm.s)))
    return x.reshape(dm.b * dm.hq, dm.sp, 1)


def s2_forward(q, k, v, kv_index, kv_count, *, block_size: int, scale: float, platform: str = "triton",
               interpret=False) -> tuple[jax.Array, jax.Array]:
    """Block-sparse causal attention.

    q [B, S, H, K]; k [B, S, G, K], v [B, S, G, W] (W = K; H = G * R: query head h uses KV head h // R);
    kv_index int32 [G, I, J]: for KV head g and query block i, the kept KV block ids in increasing order
    (padded at the end by repeating the last valid id); kv_count int32 [G, I]: how many are valid (>= 1: the
    diagonal block is always kept). I = ceil(S / block_size). Causal: inside the diagonal block key position
    <= query position; padded keys (S not a multiple of block_size) are never attended.
    `interpret` is passed to pallas_call (True, or a pltpu.InterpretParams for the tpu body).

    Returns (out [B, S, H, W] in q.dtype, lse float32 [B, H, S] = logsumexp over the attended keys of
    scale * q.k). A query block with count 0 gets out 0 and lse -inf.
    """
    dm = _dims(q, k, v, block_size, platform)
    idx, cnt = _index_args(kv_index, kv_count, dm.hkv, dm.nq, platform, "kv_index")
    o, lse = _fwd_call(_to_rows(q, dm, dm.dp), _to_rows(k, dm, dm.dp), _to_rows(v, dm, dm.dp), idx, cnt, dm,
                       scale=float(scale), platform=platform, interpret=interpret)
    return _from_rows(o, dm, dm.hq), lse[:, :dm.s, 0].reshape(dm.b, dm.hq, dm.s)


def s2_backward(q, k, v, out, lse, dout, kv_index, kv_count, q_index, q_count, *, block_size: int, scale: float,
                platform: str = "triton", interpret=False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients (dq, dk, dv) of s2_forward's out for the cotangent dout (lse gets none), same shapes/dtypes as
    q, k, v. out, lse: s2_forward's results. q_index int32 [G, J, I] / q_count [G, J]: for KV head g and
    KV block j, the query blocks that keep it (increasing, padded by repeating the last): the CSC transpose of
    kv_index. dK/dV of a KV head sum over all query heads of its group. P is recomputed from q, k and lse
    (FlashAttention-2), with delta = rowsum(dout * out) computed here in float32."""
    dm = _dims(q, k, v, block_size, platform)
    kv_idx, kv_cnt = _index_args(kv_index, kv_count, dm.hkv, dm.nq, platform, "kv_index")
    q_idx, q_cnt = _index_args(q_index, q_count, dm.hkv, dm.nq, platform, "q_index")
    delta = jnp.sum(out.astype(F32) * dout.astype(F32), axis=-1)  # [B, S, H]
    qr, kr, vr = _to_rows(q, dm, dm.dp), _to_rows(k, dm, dm.dp), _to_rows(v, dm, dm.dp)
    dor = _to_rows(dout.astype(q.dtype), dm, dm.dp)
    lser, deltar = _col_rows(lse, dm), _col_rows(jnp.transpose(delta, (0, 2, 1)), dm)
    kw = dict(scale=float(scale), platform=platform, interpret=interpret)
    dq = _dq_call(qr, kr, vr, dor, lser, deltar, kv_idx, kv_cnt, dm, **kw)
    # Query rows b*H + g*R + r == (b*G + g)*R + r: view the group's R heads back to back along the sequence.
    nkv, gsp = dm.b * dm.hkv, dm.r * dm.sp
    dk, dv = _dkdv_call(qr.reshape(nkv, gsp, dm.dp), kr, vr, dor.reshape(nkv, gsp, dm.dp), lser.reshape(nkv, gsp, 1),
                        deltar.reshape(nkv, gsp, 1), q_idx, q_cnt, dm, **kw)
    return _from_rows(dq, dm, dm.hq), _from_rows(dk, dm, dm.hkv), _from_rows(dv, dm, dm.hkv)


def csr_from_mask(block_mask) -> tuple[np.ndarray, np.ndarray]:
    """numpy bool [G, I, J] -> (index int32 [G, I, J], count int32 [G, I]): per row the kept column ids in
    increasing order, padded by repeating the last valid one (0 for an empty row); the index's last axis holds
    max(1, max count) entries."""
    bm = np.asarray(block_mask, dtype=bool)
    if bm.ndim != 3:
        raise ValueError(f"block_mask must be [H, NQ, NK], got shape {bm.shape}")
    count = bm.sum(axis=-1).astype(np.int32)
    m = max(1, int(count.max(initial=0)))
    order = np.argsort(~bm, axis=-1, kind="stable")[..., :m]  # kept columns first, increasing
    pos = np.minimum(np.arange(m), np.maximum(count[..., None] - 1, 0))
    index = np.take_along_axis(order, pos, axis=-1)
    index = np.where(count[..., None] > 0, index, 0).astype(np.int32)
    return index, count


def csc_from_mask(block_mask) -> tuple[np.ndarray, np.ndarray]:
    """numpy bool [G, I, J] -> (q_index int32 [G, J, I], q_count int32 [G, J]): per KV block the query blocks
    that keep it (the transpose of csr_from_mask)."""
    return csr_from_mask(np.swapaxes(np.asarray(block_mask, dtype=bool), 1, 2))
