"""Pallas block-sparse attention over blocks chosen at run time, with a per-query block mask (InfLLM v2).

S2's kernels (pallas_kernels/s2_attention/kernel.py) visit, per query block, a CSR list of KV blocks fixed when
tracing. Here the lists are data: every (batch, KV head) row has its own, computed from q and k in the same step,
and each query token keeps its own subset of the blocks its query block visits. So the kernels take
  kv_index [B*G, I, M] / kv_count [B*G, I]   the union over the block's queries of their kept KV blocks (CSR)
  q_index  [B*G, J, M] / q_count  [B*G, J]   its transpose (query blocks that visit KV block j), for dK / dV
  sel      [B*G, Sp, Jp] int32               1 where query row t keeps KV block j (Jp: J padded to a power of 2)
and mask every visited tile with (key <= query) & (key < S) & sel[query, j]. The math per tile (online softmax,
FlashAttention-2 backward) and the row layout are S2's (imported from there): q/out/dout [B*H, Sp, Kp], k/v
[B*G, Sp, Kp]; query row b*H + h reads KV row b*G + h // R.

"triton" bodies (GPU; also the CPU interpreter): the index row through an ordinary BlockSpec, a fori_loop over the
valid entries. "tpu" bodies (Mosaic): indices as scalar prefetch driving the K/V (or Q) index_maps, a third
"arbitrary" grid axis over the entries, entries >= count skipped with pl.when. The column j of a (rows, Jp) mask
tile is picked with an iota compare and a row sum (no dynamic lane slicing).

Limitations: one block = one kernel tile; untuned (no GPU or TPU was available: interpret-mode runs and
ahead-of-time compiles for cuda / tpu only); M = J (a query block may visit every causal block), so the TPU
grid has J steps per query block, the ones past the count skipped.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..common import F32, PAR, SEQ, compiler_params, next_pow2, sds
from ..s2_attention.kernel import (_blk, _col_rows, _dims, _dkdv_step, _dq_step, _fwd_finish, _fwd_init,
                                   _fwd_step, _from_rows, _mask, _rem, _to_rows)


def _column(sel, j):
    """(rows, 1) bool: column j of an int (rows, Jp) tile."""
    lanes = lax.broadcasted_iota(jnp.int32, sel.shape, 1)
    return jnp.sum(jnp.where(lanes == j, sel, 0), axis=1, keepdims=True) > 0


# ---- "triton" bodies -----------------------------------------------------------------------------------------


def _fwd_loop(idx_ref, cnt_ref, sel_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, bs, scale, seq_len):
    i = pl.program_id(1)
    q, sel = q_ref[...], sel_ref[...]

    def body(t, carry):
        j = idx_ref[t]
        rows = _blk(j, bs)
        mask = _mask(i, j, bs, seq_len) & _column(sel, j)
        return _fwd_step(q, k_ref[rows, :], v_ref[rows, :], mask, *carry, scale)

    out, lse = _fwd_finish(*lax.fori_loop(0, cnt_ref[0], body, _fwd_init(bs, q.shape[-1])))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_loop(idx_ref, cnt_ref, sel_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, *, bs, scale, seq_len):
    i = pl.program_id(1)
    q, do, lse, delta, sel = q_ref[...], do_ref[...], lse_ref[...], dl_ref[...], sel_ref[...]

    def body(t, dq):
        j = idx_ref[t]
        rows = _blk(j, bs)
        mask = _mask(i, j, bs, seq_len) & _column(sel, j)
        return dq + _dq_step(q, k_ref[rows, :], v_ref[rows, :], do, lse, delta, mask, scale)

    dq_ref[...] = lax.fori_loop(0, cnt_ref[0], body, jnp.zeros(q.shape, F32)).astype(dq_ref.dtype)


def _dkdv_loop(idx_ref, cnt_ref, sel_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, *, bs, scale,
               seq_len, groups, sp):
    j = pl.program_id(1)
    k, v = k_ref[...], v_ref[...]
    count = cnt_ref[0]

    def head(r, carry):  # the group's query heads sit back to back along the (R*Sp) axis
        def body(t, carry):
            dk, dv = carry
            i = idx_ref[t]
            rows = pl.ds(pl.multiple_of(r * sp + i * bs, bs), bs)
            mask = _mask(i, j, bs, seq_len) & _column(sel_ref[_blk(i, bs), :], j)
            ddk, ddv = _dkdv_step(q_ref[rows, :], k, v, do_ref[rows, :], lse_ref[rows, :], dl_ref[rows, :], mask,
                                  scale)
            return dk + ddk, dv + ddv

        return lax.fori_loop(0, count, body, carry)

    zeros = jnp.zeros(k.shape, F32)
    dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---- "tpu" bodies --------------------------------------------------------------------------------------------


def _fwd_grid(idx_ref, cnt_ref, sel_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, bs, scale,
              seq_len, nq, m_len, kv_row):
    n, i, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = kv_row(n) * nq + i

    @pl.when(t == 0)
    def _init():
        m_scr[...], l_scr[...], acc_scr[...] = _fwd_init(bs, acc_scr.shape[-1])

    @pl.when(t < cnt_ref[row])
    def _step():
        j = idx_ref[row * m_len + t]
        mask = _mask(i, j, bs, seq_len) & _column(sel_ref[...], j)
        m, l, acc = _fwd_step(q_ref[...], k_ref[...], v_ref[...], mask, m_scr[...], l_scr[...], acc_scr[...], scale)
        m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

    @pl.when(t == m_len - 1)
    def _done():
        out, lse = _fwd_finish(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _dq_grid(idx_ref, cnt_ref, sel_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, dq_scr, *, bs, scale,
             seq_len, nq, m_len, kv_row):
    n, i, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = kv_row(n) * nq + i

    @pl.when(t == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, F32)

    @pl.when(t < cnt_ref[row])
    def _step():
        j = idx_ref[row * m_len + t]
        mask = _mask(i, j, bs, seq_len) & _column(sel_ref[...], j)
        dq_scr[...] += _dq_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], dl_ref[...], mask,
                                scale)

    @pl.when(t == m_len - 1)
    def _done():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkdv_grid(idx_ref, cnt_ref, sel_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, dk_scr,
               dv_scr, *, bs, scale, seq_len, nk, m_len, groups):
    n, j, u = pl.program_id(0), pl.program_id(1), pl.program_id(2)  # u = r * m_len + t (query head r of the group)
    row = n * nk + j
    t = _rem(u, m_len)

    @pl.when(u == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, F32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, F32)

    @pl.when(t < cnt_ref[row])
    def _step():
        i = idx_ref[row * m_len + t]
        mask = _mask(i, j, bs, seq_len) & _column(sel_ref[...], j)
        dk, dv = _dkdv_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], dl_ref[...], mask, scale)
        dk_scr[...] += dk
        dv_scr[...] += dv

    @pl.when(u == groups * m_len - 1)
    def _done():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ---- pallas_call wrappers ------------------------------------------------------------------------------------


def _fwd_call(q, k, v, sel, idx, cnt, dm, *, scale, platform, interpret):
    nrows, bs, dp, sp, nq, jp = dm.b * dm.hq, dm.bs, dm.dp, dm.sp, dm.nq, sel.shape[-1]
    out_shape = (sds((nrows, sp, dp), q.dtype), sds((nrows, sp, 1)))
    kw = dict(bs=bs, scale=scale, seq_len=dm.s)
    params = compiler_params(platform, interpret, (PAR, PAR, SEQ), bs * dp)
    m = idx.shape[-1]
    if platform == "triton":
        return pl.pallas_call(
            functools.partial(_fwd_loop, **kw), out_shape=out_shape, grid=(nrows, nq),
            in_specs=[pl.BlockSpec((None, None, m), lambda n, i: (dm.kv_row(n), i, 0)),
                      pl.BlockSpec((None, None, 1), lambda n, i: (dm.kv_row(n), i, 0)),
                      pl.BlockSpec((None, bs, jp), lambda n, i: (dm.kv_row(n), i, 0)),
                      pl.BlockSpec((None, bs, dp), lambda n, i: (n, i, 0)),
                      pl.BlockSpec((None, sp, dp), lambda n, i: (dm.kv_row(n), 0, 0)),
                      pl.BlockSpec((None, sp, dp), lambda n, i: (dm.kv_row(n), 0, 0))],
            out_specs=[pl.BlockSpec((None, bs, dp), lambda n, i: (n, i, 0)),
                       pl.BlockSpec((None, bs, 1), lambda n, i: (n, i, 0))],
            compiler_params=params, interpret=interpret, name="infllm_fwd",
        )(idx, cnt, sel, q, k, v)
    kv_map = lambda n, i, t, ix, c: (dm.kv_row(n), ix[(dm.kv_row(n) * nq + i) * m + t], 0)  # noqa: E731
    own = lambda n, i, t, ix, c: (n, i, 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(nrows, nq, m),
        in_specs=[pl.BlockSpec((None, bs, jp), lambda n, i, t, ix, c: (dm.kv_row(n), i, 0)),
                  pl.BlockSpec((None, bs, dp), own), pl.BlockSpec((None, bs, dp), kv_map),
                  pl.BlockSpec((None, bs, dp), kv_map)],
        out_specs=[pl.BlockSpec((None, bs, dp), own), pl.BlockSpec((None, bs, 1), own)],
        scratch_shapes=[pltpu.VMEM((bs, 1), F32), pltpu.VMEM((bs, 1), F32), pltpu.VMEM((bs, dp), F32)])
    return pl.pallas_call(
        functools.partial(_fwd_grid, nq=nq, m_len=m, kv_row=dm.kv_row, **kw), out_shape=out_shape,
        grid_spec=grid_spec, compiler_params=params, interpret=interpret, name="infllm_fwd",
    )(idx.reshape(-1), cnt.reshape(-1), sel, q, k, v)


def _dq_call(q, k, v, do, lse, delta, sel, idx, cnt, dm, *, scale, platform, interpret):
    nrows, bs, dp, sp, nq, jp = dm.b * dm.hq, dm.bs, dm.dp, dm.sp, dm.nq, sel.shape[-1]
    out_shape = sds((nrows, sp, dp), q.dtype)
    kw = dict(bs=bs, scale=scale, seq_len=dm.s)
    params = compiler_params(platform, interpret, (PAR, PAR, SEQ), bs * dp)
    m = idx.shape[-1]
    if platform == "triton":
        own = lambda w: pl.BlockSpec((None, bs, w), lambda n, i: (n, i, 0))  # noqa: E731
        full_kv = pl.BlockSpec((None, sp, dp), lambda n, i: (dm.kv_row(n), 0, 0))
        return pl.pallas_call(
            functools.partial(_dq_loop, **kw), out_shape=out_shape, grid=(nrows, nq),
            in_specs=[pl.BlockSpec((None, None, m), lambda n, i: (dm.kv_row(n), i, 0)),
                      pl.BlockSpec((None, None, 1), lambda n, i: (dm.kv_row(n), i, 0)),
                      pl.BlockSpec((None, bs, jp), lambda n, i: (dm.kv_row(n), i, 0)),
                      own(dp), full_kv, full_kv, own(dp), own(1), own(1)],
            out_specs=own(dp), compiler_params=params, interpret=interpret, name="infllm_bwd_dq",
        )(idx, cnt, sel, q, k, v, do, lse, delta)
    kv_map = lambda n, i, t, ix, c: (dm.kv_row(n), ix[(dm.kv_row(n) * nq + i) * m + t], 0)  # noqa: E731
    own = lambda w: pl.BlockSpec((None, bs, w), lambda n, i, t, ix, c: (n, i, 0))  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(nrows, nq, m),
        in_specs=[pl.BlockSpec((None, bs, jp), lambda n, i, t, ix, c: (dm.kv_row(n), i, 0)),
                  own(dp), pl.BlockSpec((None, bs, dp), kv_map), pl.BlockSpec((None, bs, dp), kv_map), own(dp),
                  own(1), own(1)],
        out_specs=own(dp), scratch_shapes=[pltpu.VMEM((bs, dp), F32)])
    return pl.pallas_call(
        functools.partial(_dq_grid, nq=nq, m_len=m, kv_row=dm.kv_row, **kw), out_shape=out_shape,
        grid_spec=grid_spec, compiler_params=params, interpret=interpret, name="infllm_bwd_dq",
    )(idx.reshape(-1), cnt.reshape(-1), sel, q, k, v, do, lse, delta)


def _dkdv_call(qg, k, v, dog, lseg, deltag, sel, idx, cnt, dm, *, scale, platform, interpret):
    """qg, dog: [B*G, R*Sp, Kp]; lseg, deltag: [B*G, R*Sp, 1]."""
    nrows, bs, dp, sp, nk, r, jp = dm.b * dm.hkv, dm.bs, dm.dp, dm.sp, dm.nq, dm.r, sel.shape[-1]
    out_shape = (sds((nrows, sp, dp), k.dtype), sds((nrows, sp, dp), v.dtype))
    kw = dict(bs=bs, scale=scale, seq_len=dm.s)
    params = compiler_params(platform, interpret, (PAR, PAR, SEQ), bs * dp)
    m = idx.shape[-1]
    if platform == "triton":
        own = pl.BlockSpec((None, bs, dp), lambda n, j: (n, j, 0))
        full = lambda w: pl.BlockSpec((None, r * sp, w), lambda n, j: (n, 0, 0))  # noqa: E731
        return pl.pallas_call(
            functools.partial(_dkdv_loop, groups=r, sp=sp, **kw), out_shape=out_shape, grid=(nrows, nk),
            in_specs=[pl.BlockSpec((None, None, m), lambda n, j: (n, j, 0)),
                      pl.BlockSpec((None, None, 1), lambda n, j: (n, j, 0)),
                      pl.BlockSpec((None, sp, jp), lambda n, j: (n, 0, 0)),
                      full(dp), own, own, full(dp), full(1), full(1)],
            out_specs=[own, own], compiler_params=params, interpret=interpret, name="infllm_bwd_dkdv",
        )(idx, cnt, sel, qg, k, v, dog, lseg, deltag)

    def q_block(n, j, u, ix):
        return ix[(n * nk + j) * m + _rem(u, m)]

    def q_map(n, j, u, ix, c):  # query head r = u // m of the group; its q block id from the CSC list
        return n, lax.div(u, m) * nk + q_block(n, j, u, ix), 0

    own = pl.BlockSpec((None, bs, dp), lambda n, j, u, ix, c: (n, j, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(nrows, nk, r * m),
        in_specs=[pl.BlockSpec((None, bs, jp), lambda n, j, u, ix, c: (n, q_block(n, j, u, ix), 0)),
                  pl.BlockSpec((None, bs, dp), q_map), own, own, pl.BlockSpec((None, bs, dp), q_map),
                  pl.BlockSpec((None, bs, 1), q_map), pl.BlockSpec((None, bs, 1), q_map)],
        out_specs=[own, own], scratch_shapes=[pltpu.VMEM((bs, dp), F32), pltpu.VMEM((bs, dp), F32)])
    return pl.pallas_call(
        functools.partial(_dkdv_grid, nk=nk, m_len=m, groups=r, **kw), out_shape=out_shape,
        grid_spec=grid_spec, compiler_params=params, interpret=interpret, name="infllm_bwd_dkdv",
    )(idx.reshape(-1), cnt.reshape(-1), sel, qg, k, v, dog, lseg, deltag)


# ---- public functions ----------------------------------------------------------------------------------------


def csr(mask_NIJ, platform: str):
    """bool [N, I, J] (traced) -> (index int32 [N, I, M], count int32 [N, I]): per row the kept column ids,
    increasing, padded by repeating the last valid one (0 for an empty row). M = J, rounded up to a power of two
    for Triton (the row is a kernel array)."""
    n, i, j = mask_NIJ.shape
    count = jnp.sum(mask_NIJ, axis=-1, dtype=jnp.int32)
    order = jnp.argsort(~mask_NIJ, axis=-1, stable=True).astype(jnp.int32)  # kept columns first, increasing
    m = next_pow2(j) if platform == "triton" else j
    pos = jnp.minimum(jnp.arange(m), jnp.maximum(count[..., None] - 1, 0))
    index = jnp.take_along_axis(order, jnp.minimum(pos, j - 1), axis=-1)
    return jnp.where(count[..., None] > 0, index, 0), count


def _selection_rows(mask_BGSJ, dm):
    """[B, G, S, J] bool -> int32 [B*G, Sp, Jp] (Jp a power of two >= 16 and >= J; zero padded)."""
    b, g, s, j = mask_BGSJ.shape
    jp = max(16, next_pow2(j))
    sel = jnp.pad(mask_BGSJ.astype(jnp.int32), ((0, 0), (0, 0), (0, dm.sp - s), (0, jp - j)))
    return sel.reshape(b * g, dm.sp, jp)


def _layouts(mask_BGSJ, dm, platform):
    from .reference import union_per_query_block

    union = union_per_query_block(mask_BGSJ, dm.bs)
    union = union.reshape(-1, *union.shape[2:])  # [B*G, I, J]
    kv_idx, kv_cnt = csr(union, platform)
    q_idx, q_cnt = csr(jnp.swapaxes(union, 1, 2), platform)
    return kv_idx, kv_cnt[..., None], q_idx, q_cnt[..., None]


def infllm_forward(q, k, v, mask_BGSJ, *, block_size: int, scale: float, platform: str = "triton", interpret=False):
    """(out [B, S, H, W] in q.dtype, lse float32 [B, H, S]) of causal attention where query t of KV head g reads
    key u iff u <= t and mask[b, g, t, u // block_size]. A query that reads nothing gets out 0, lse -inf."""
    dm = _dims(q, k, v, block_size, platform)
    kv_idx, kv_cnt, _, _ = _layouts(mask_BGSJ, dm, platform)
    o, lse = _fwd_call(_to_rows(q, dm, dm.dp), _to_rows(k, dm, dm.dp), _to_rows(v, dm, dm.dp),
                       _selection_rows(mask_BGSJ, dm), kv_idx, kv_cnt, dm, scale=float(scale), platform=platform,
                       interpret=interpret)
    return _from_rows(o, dm, dm.hq), lse[:, :dm.s, 0].reshape(dm.b, dm.hq, dm.s)


def infllm_backward(q, k, v, out, lse, dout, mask_BGSJ, *, block_size: int, scale: float, platform: str = "triton",
                    interpret=False):
    """(dq, dk, dv) of infllm_forward's out for the cotangent dout; P recomputed from q, k and lse."""
    dm = _dims(q, k, v, block_size, platform)
    kv_idx, kv_cnt, q_idx, q_cnt = _layouts(mask_BGSJ, dm, platform)
    sel = _selection_rows(mask_BGSJ, dm)
    delta = jnp.sum(out.astype(F32) * dout.astype(F32), axis=-1)  # [B, S, H]
    qr, kr, vr = _to_rows(q, dm, dm.dp), _to_rows(k, dm, dm.dp), _to_rows(v, dm, dm.dp)
    dor = _to_rows(dout.astype(q.dtype), dm, dm.dp)
    lser, deltar = _col_rows(lse, dm), _col_rows(jnp.transpose(delta, (0, 2, 1)), dm)
    kw = dict(scale=float(scale), platform=platform, interpret=interpret)
    dq = _dq_call(qr, kr, vr, dor, lser, deltar, sel, kv_idx, kv_cnt, dm, **kw)
    nkv, gsp = dm.b * dm.hkv, dm.r * dm.sp
    dk, dv = _dkdv_call(qr.reshape(nkv, gsp, dm.dp), kr, vr, dor.reshape(nkv, gsp, dm.dp),
                        lser.reshape(nkv, gsp, 1), deltar.reshape(nkv, gsp, 1), sel, q_idx, q_cnt, dm, **kw)
    return _from_rows(dq, dm, dm.hq), _from_rows(dk, dm, dm.hkv), _from_rows(dv, dm, dm.hkv)
