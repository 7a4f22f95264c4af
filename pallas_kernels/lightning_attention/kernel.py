"""Pallas kernels for Lightning Attention-2 (forward and backward).

Kernel layout (prepared by ops.py): rows are flattened (batch, head) pairs, B*H of them:
    q, k: [B*H, Sp, Kp]   v, do: [B*H, Sp, Wp]   rate: [B*H, 1, 1] f32   states: [B*H, Kp, Wp] f32
with Sp (S padded) a multiple of the block and the true length `seq_len` <= Sp (zero padding). Block t has
m_t = clip(seq_len - t*blk, 0, blk) valid rows; the block decays below use m_t so padding never decays the state
(Sp may hold whole blocks of padding when a kernel runs a smaller block than ops.py padded for).

Two variants of every sequential kernel, picked by `platform`:

* "triton" (GPU, and the CPU interpreter): grid (B*H, d_v tiles); the block axis is a `fori_loop` inside the
  kernel. Triton runs all grid points concurrently, so a carried state cannot live on a grid axis.
  Every in-kernel array has power-of-two dims (ops.py pads d_k/d_v to a power of two >= 16 and uses a
  power-of-two block >= 16, also the minimum for tl.dot).
* "tpu" (Mosaic): grid (B*H, d_v tiles, blocks) with the block axis "arbitrary" (sequential) and the d_k x tv
  state in a float32 VMEM scratch; Mosaic pipelines the per-block HBM<->VMEM copies. Block shapes are
  (blk, full d_k) and (blk, tv) with blk a multiple of 8 (16 for bf16) and tv a multiple of 128 or all of d_v.

Head-dim tiling: the state is d_k x d_v and every d_v column of it, of o, dv and d(initial_state) depends only on
its own column tile, so all kernels run per d_v tile (a parallel grid axis; q k^T is recomputed per tile). dq and
dk are sums over tiles: with more than one tile the backward kernels write float32 partials [tiles, B*H, Sp, Kp]
that the caller sums. Tile widths and the block each kernel family really uses come from `fwd_tiles` /
`bwd_tiles` below: one tile and the asked block wherever that fits one Triton program in an H100's shared memory
or one Mosaic program in v5e VMEM; else narrower tiles and, for wide d_k, a smaller block.

Kernels:
  forward:           o, final_state     (sequential over blocks)
  backward intra:    dq, dk (partials), dv of the intra-block (left-product) part; grid (B*H, tiles, blocks),
                     fully parallel
  backward dq sweep: dq += (Lambda dO_t) KV_{t-1}^T            forward over blocks, carries KV (prefix state)
  backward dkdv:     dk += (Gamma V_t) dKV^T, dv += (Gamma K_t) dKV; reverse over blocks, carries
                     dKV (suffix state); what is left of dKV at the end is d(initial_state).
All matmuls accumulate in float32 (preferred_element_type); float32 operands use HIGHEST precision (IEEE on
Triton instead of tf32, multi-pass on TPU instead of one bf16 pass). On Triton a float32 dot lowers to unrolled IEEE
FMAs: the dq and dk/dv sweeps spill registers at 128-wide heads (docs/hardware.md). mLSTM's fix, 3-term bf16
splits on the tensor cores (common.split_dot), asks for more shared memory than the tiles here were sized for
(256 KiB at d 128, block 128): it needs the shared-memory model below refitted first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..common import F32, MIN_DIM, PAR, PLATFORMS, SEQ, check_platform, compiler_params, dot as _dot, matmul



# --------------------------------------------------------------------------------------------------------------
# In-kernel math shared by all kernels and both variants
# --------------------------------------------------------------------------------------------------------------


def _block_consts(rate_11, blk: int):
    """Decays that are the same for every block. rate_11: (1, 1) f32.

    mask (Y, Y): lam^(i-j) for i >= j else 0;  q_dec (Y, 1): lam^(i+1) (row i reads the carried state).
    """
    i = lax.broadcasted_iota(jnp.int32, (blk, blk), 0)
    j = lax.broadcasted_iota(jnp.int32, (blk, blk), 1)
    diff = i - j
    # Clamp before exp so the masked-out triangle stays finite (no inf * 0).
    mask = jnp.where(diff >= 0, jnp.exp(-rate_11 * jnp.maximum(diff, 0).astype(F32)), 0.0)
    r = lax.broadcasted_iota(jnp.int32, (blk, 1), 0)
    q_dec = jnp.exp(-rate_11 * (r + 1).astype(F32))
    return mask, q_dec


def _tail_decays(rate_11, blk: int, m):
    """Decays that depend on the block's number of valid rows m (only the last block can have m < blk).

    k_dec (Y, 1): lam^(m-1-j) for j < m else 0 (row j's weight at the block's last valid row; padded rows get
    0, so padding never decays the state);  blk_dec (1, 1): lam^m (carried state across the block).
    """
    r = lax.broadcasted_iota(jnp.int32, (blk, 1), 0)
    kd = m - 1 - r
    k_dec = jnp.where(kd >= 0, jnp.exp(-rate_11 * jnp.maximum(kd, 0).astype(F32)), 0.0)
    blk_dec = jnp.exp(-rate_11 * jnp.asarray(m, jnp.int32).astype(F32))
    return k_dec, blk_dec


def _valid(seq_len: int, blk: int, t):
    # 0 for a block of padding only: a kernel may run a smaller block than the one Sp is a multiple of, so whole
    # blocks past seq_len exist; with m = 0 they leave the state as it is (k_dec = 0, blk_dec = 1).
    return jnp.clip(seq_len - t * blk, 0, blk)


def _fwd_block(q, k, v, kv, consts, rate, blk, m, dot=_dot):
    """One block of the forward: returns (o f32 [Y, tv], new kv f32 [Kp, tv]) (Y = blk rows of the block)."""
    mask, q_dec = consts
    k_dec, blk_dec = _tail_decays(rate, blk, m)
    s = dot(q, k, 1, 1) * mask  # (Q K^T) * M
    o = dot(s.astype(v.dtype), v, 1, 0)  # intra-block left product
    o = o + dot(q, kv, 1, 0) * q_dec  # inter-block: (Lambda Q) KV
    kv = kv * blk_dec + dot(k.astype(F32) * k_dec, v, 0, 0)  # (Gamma K)^T V
    return o, kv


def _dq_inter(do, k, v, kv, dq_intra, q_dec, rate, blk, m, dot=_dot):
    k_dec, blk_dec = _tail_decays(rate, blk, m)
    dq = dq_intra + dot(do.astype(F32) * q_dec, kv, 1, 1)  # (Lambda dO) KV^T
    kv = kv * blk_dec + dot(k.astype(F32) * k_dec, v, 0, 0)
    return dq, kv


def _dkdv_inter(q, k, v, do, dkv, dk_intra, dv_intra, q_dec, rate, blk, m, dot=_dot):
    k_dec, blk_dec = _tail_decays(rate, blk, m)
    dk = dk_intra + dot(v.astype(F32) * k_dec, dkv, 1, 1)  # (Gamma V) dKV^T
    dv = dv_intra + dot(k.astype(F32) * k_dec, dkv, 1, 0)  # (Gamma K) dKV
    dkv = dkv * blk_dec + dot(q.astype(F32) * q_dec, do, 0, 0)  # (Lambda Q)^T dO
    return dk, dv, dkv


# --------------------------------------------------------------------------------------------------------------
# Kernel bodies
# --------------------------------------------------------------------------------------------------------------


def _fwd_kernel_loop(rate_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, st_ref, *, blk, seq_len, nblocks):
    rate = rate_ref[...]
    consts = _block_consts(rate, blk)  # hoisted out of the block loop

    def body(t, kv):
        rows = pl.ds(pl.multiple_of(t * blk, blk), blk)
        o, kv = _fwd_block(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], kv, consts, rate, blk,
                           _valid(seq_len, blk, t))
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return kv

    st_ref[...] = lax.fori_loop(0, nblocks, body, s0_ref[...].astype(F32))


def _fwd_kernel_grid(rate_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, st_ref, kv_scr, *, blk, seq_len):
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _init():
        kv_scr[...] = s0_ref[...].astype(F32)

    rate = rate_ref[...]
    o, kv = _fwd_block(q_ref[...], k_ref[...], v_ref[...], kv_scr[...], _block_consts(rate, blk), rate, blk,
                       _valid(seq_len, blk, t))
    o_ref[...] = o.astype(o_ref.dtype)
    kv_scr[...] = kv

    @pl.when(t == pl.num_programs(2) - 1)
    def _done():
        st_ref[...] = kv


def _bwd_intra_kernel(rate_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, *, blk, dot):
    # Padded rows of q/k/v/do are zero, so they add nothing here: no valid-row logic needed.
    mask, _ = _block_consts(rate_ref[...], blk)
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    dp = dot(do, v, 1, 1) * mask  # (dO V^T) * M
    s = dot(q, k, 1, 1) * mask  # (Q K^T) * M
    dq_ref[...] = dot(dp.astype(k.dtype), k, 1, 0)
    dk_ref[...] = dot(dp.astype(q.dtype), q, 0, 0)
    dv_ref[...] = dot(s.astype(do.dtype), do, 0, 0)


def _dq_kernel_loop(rate_ref, k_ref, v_ref, do_ref, s0_ref, dqi_ref, dq_ref, *, blk, seq_len, nblocks):
    rate = rate_ref[...]
    _, q_dec = _block_consts(rate, blk)

    def body(t, kv):
        rows = pl.ds(pl.multiple_of(t * blk, blk), blk)
        dq, kv = _dq_inter(do_ref[rows, :], k_ref[rows, :], v_ref[rows, :], kv, dqi_ref[rows, :], q_dec, rate, blk,
                           _valid(seq_len, blk, t))
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        return kv

    lax.fori_loop(0, nblocks, body, s0_ref[...].astype(F32))


def _dq_kernel_grid(rate_ref, k_ref, v_ref, do_ref, s0_ref, dqi_ref, dq_ref, kv_scr, *, blk, seq_len):
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _init():
        kv_scr[...] = s0_ref[...].astype(F32)

    rate = rate_ref[...]
    _, q_dec = _block_consts(rate, blk)
    dq, kv = _dq_inter(do_ref[...], k_ref[...], v_ref[...], kv_scr[...], dqi_ref[...], q_dec, rate, blk,
                       _valid(seq_len, blk, t))
    dq_ref[...] = dq.astype(dq_ref.dtype)
    kv_scr[...] = kv


def _dkdv_kernel_loop(rate_ref, q_ref, k_ref, v_ref, do_ref, dst_ref, dki_ref, dvi_ref, dk_ref, dv_ref, ds0_ref,
                      *, blk, seq_len, nblocks):
    rate = rate_ref[...]
    _, q_dec = _block_consts(rate, blk)

    def body(i, dkv):
        t = nblocks - 1 - i  # reverse sweep
        rows = pl.ds(pl.multiple_of(t * blk, blk), blk)
        dk, dv, dkv = _dkdv_inter(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :], dkv,
                                  dki_ref[rows, :], dvi_ref[rows, :], q_dec, rate, blk, _valid(seq_len, blk, t))
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        return dkv

    ds0_ref[...] = lax.fori_loop(0, nblocks, body, dst_ref[...].astype(F32))


def _dkdv_kernel_grid(rate_ref, q_ref, k_ref, v_ref, do_ref, dst_ref, dki_ref, dvi_ref, dk_ref, dv_ref, ds0_ref,
                      dkv_scr, *, blk, seq_len):
    i = pl.program_id(2)
    t = pl.num_programs(2) - 1 - i  # the index maps walk the blocks backwards

    @pl.when(i == 0)
    def _init():
        dkv_scr[...] = dst_ref[...].astype(F32)

    rate = rate_ref[...]
    _, q_dec = _block_consts(rate, blk)
    dk, dv, dkv = _dkdv_inter(q_ref[...], k_ref[...], v_ref[...], do_ref[...], dkv_scr[...], dki_ref[...],
                              dvi_ref[...], q_dec, rate, blk, _valid(seq_len, blk, t))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dkv_scr[...] = dkv

    @pl.when(i == pl.num_programs(2) - 1)
    def _done():
        ds0_ref[...] = dkv


# --------------------------------------------------------------------------------------------------------------
# pallas_call wrappers
# --------------------------------------------------------------------------------------------------------------


# Tile choice. One program's working set grows with the sequence block (blk) times d_k and with the d_k x tv f32
# state (tv = d_v tile). Every result column of d_v depends only on its own tile, so splitting d_v over a grid axis
# is exact (dq and dk become per-tile partials that the caller sums); the block only sets how the sequence is cut,
# so results do not depend on it beyond float rounding, and each kernel family (forward, backward) may use a smaller
# block than asked for. Both choices keep the asked block and one tile wherever that already fits.

H100_SMEM = 227 * 1024  # shared memory one CUDA block (Triton program) may use on an H100 (opt-in maximum)
TPU_VMEM = 12 * 2**20  # our share of Mosaic's 16 MiB default scoped VMEM (v5e); the rest for its own temporaries


def _triton_smem(kernel: str, blk: int, kp: int, tv: int, itemsize: int) -> int:
    """Shared memory (bytes) Triton allocates for one program of `kernel`, for inputs of `itemsize` bytes.

    An upper bound fitted to jax 0.10.2's Triton for sm_90 (num_stages=2), each kernel compiled alone, bf16 and
    f32, blocks 16-128, d_k 16-512, tv 16-512: XLA's "requested N" where the kernel did not fit and the launch's
    dynamic shared memory (pallas_kernels.gpu_resources) where it did. Triton's allocator takes the largest set of
    buffers alive at once (the dot operands, staged through shared memory, and layout conversions), so each kernel
    is a max over such sets; tests/test_lightning_attention_op.py keeps the measured table (exact for most entries,
    at most 1.5x above any). f16 is taken as bf16."""
    state = 4 * kp * tv  # the f32 (d_k, tv) state as a dot operand
    lo, hi = min(kp, tv), max(kp, tv)
    if itemsize <= 2:
        sets = {
            "fwd": (blk * (8 * kp + 6 * tv), state + 2 * blk * (kp + tv + blk)),
            "intra": (4 * blk * (kp + tv), blk * (6 * kp + 2 * tv), 2 * blk * (blk + kp + tv)),
            "dq": (state + blk * (2 * kp + 8 * tv), blk * (6 * kp + 8 * tv)),
            "dkdv": (state + blk * (4 * lo + 8 * hi), 8 * blk * (kp + tv)),
        }
    else:
        sets = {
            "fwd": (blk * (12 * kp + 4 * tv), state + 4 * blk * (kp + tv + blk)),
            "intra": (8 * blk * (kp + tv), 4 * blk * (2 * blk + tv)),
            "dq": (state + blk * (4 * kp + 12 * tv), 8 * blk * (kp + tv)),
            "dkdv": (state + blk * (8 * lo + 12 * hi),),
        }
    return max(sets[kernel])


def _tpu_vmem(blk: int, kp: int, tv: int, itemsize: int) -> int:
    """A bound on the scoped VMEM (bytes) of one program of any of the kernels on TPU: double-buffered (blk, d)
    blocks in the input dtype and f32, about eight (d_k, tv) f32 states (state blocks in and out, double-buffered,
    the scratch and the update's temporaries) and the (blk, blk) decay mask and scores. Against Mosaic's reported
    scoped allocations for v5e (jax 0.10.2): 23.3 MiB estimated for 20.7 MiB (bf16, blk 128, d_k 512, tv 1024,
    dk/dv sweep) and 31.5 for 25.3 (blk 256): an overestimate by 12-25%."""
    return 8 * 4 * kp * tv + blk * (kp + tv) * (6 * itemsize + 24) + 8 * 4 * blk * blk


def _pow2_tiles(top: int) -> list[int]:
    """top, top/2, ... down to MIN_DIM (top alone if it is smaller)."""
    return [t for t in (top >> i for i in range(top.bit_length())) if t >= MIN_DIM] or [top]


def _choose(kernels, platform: str, blk: int, kp: int, vp: int, itemsize: int, v_tiles) -> tuple[int, int]:
    """(block, d_v tile): the largest block (the asked one, then halves down to MIN_DIM) for which some tile of
    at least 32 columns fits (failing that, any tile), with the widest tile that fits. Triton: all `kernels` fit
    H100 shared memory; TPU: the VMEM bound (the same for all kernels). Where nothing fits, the smallest pair (the
    compiler then names the shortfall)."""
    if platform == "tpu":
        fits = lambda b, t: _tpu_vmem(b, kp, t, itemsize) <= TPU_VMEM
    else:
        fits = lambda b, t: all(_triton_smem(kn, b, kp, t, itemsize) <= H100_SMEM for kn in kernels)
    blocks = _pow2_tiles(blk)  # the asked block, then its halves
    for narrowest in (min(v_tiles[0], 32), 0):  # first without tiles under 32 columns: rather a smaller block
        for b in blocks:
            for t in v_tiles:
                if t >= narrowest and fits(b, t):
                    return b, t
    return blocks[-1], v_tiles[-1]


def _check_tiles(name: str, sp: int, blk: int, vp: int, tv: int) -> None:
    if sp % blk or vp % tv:
        raise ValueError(f"{name}: block {blk} / d_v tile {tv} do not divide the padded lengths {sp} / {vp}")


def fwd_tiles(platform: str, blk: int, kp: int, vp: int, itemsize: int) -> tuple[int, int]:
    """(block, d_v tile) of the forward kernel. Triton: tiles of at most 32 columns (more parallel programs, a
    small f32 state per program); TPU: 128 lanes when d_v is a wider multiple of 128, else one tile."""
    if platform == "tpu":  # lane dim: a multiple of 128 or the full dim
        return _choose((), platform, blk, kp, vp, itemsize, [128 if vp > 128 and vp % 128 == 0 else vp])
    return _choose(("fwd",), platform, blk, kp, vp, itemsize, _pow2_tiles(min(vp, 32)))


def bwd_tiles(platform: str, blk: int, kp: int, vp: int, itemsize: int) -> tuple[int, int]:
    """(block, d_v tile) of the three backward kernels (they share both: the intra-block part and the sweeps
    split the sequence the same way, and the sweeps read the intra-block partials tile by tile). One tile (all
    of d_v) where it fits. TPU tiles are multiples of 128 lanes dividing d_v (pad_dim makes d_v > 128 one)."""
    if platform == "tpu":
        tiles = [vp] + [t for t in range(vp - 128, 127, -128) if vp % t == 0]
        return _choose((), platform, blk, kp, vp, itemsize, tiles)
    return _choose(("intra", "dq", "dkdv"), platform, blk, kp, vp, itemsize, _pow2_tiles(vp))


def lightning_fwd(q, k, v, rate, s0, *, seq_len: int, blk: int, platform: str, interpret: bool = False,
                  v_tile: int | None = None):
    """Forward kernel. q, k: [B*H, Sp, Kp]; v: [B*H, Sp, Wp]; rate: [B*H, 1, 1] f32; s0: [B*H, Kp, Wp] f32.

    Returns (o [B*H, Sp, Wp] in v's dtype, final_state [B*H, Kp, Wp] f32). Rows >= seq_len of o are zero (their q
    rows are zero padding); the caller slices them off. Block and d_v tile are `fwd_tiles(...)` (the block may be
    smaller than `blk`, which must divide Sp); `v_tile` forces the tile and keeps `blk` (tests, measurements).
    """
    check_platform(platform)
    n, sp, kp = q.shape
    vp = v.shape[-1]
    if v_tile is None:
        blk, tv = fwd_tiles(platform, blk, kp, vp, q.dtype.itemsize)
    else:
        tv = v_tile
    _check_tiles("lightning_fwd", sp, blk, vp, tv)
    nblocks = sp // blk
    nv = vp // tv
    out_shape = (jax.ShapeDtypeStruct((n, sp, vp), v.dtype), jax.ShapeDtypeStruct((n, kp, vp), F32))
    if platform == "triton":
        kernel = functools.partial(_fwd_kernel_loop, blk=blk, seq_len=seq_len, nblocks=nblocks)
        in_specs = [
            pl.BlockSpec((None, 1, 1), lambda b, j: (b, 0, 0)),
            pl.BlockSpec((None, sp, kp), lambda b, j: (b, 0, 0)),
            pl.BlockSpec((None, sp, kp), lambda b, j: (b, 0, 0)),
            pl.BlockSpec((None, sp, tv), lambda b, j: (b, 0, j)),
            pl.BlockSpec((None, kp, tv), lambda b, j: (b, 0, j)),
        ]
        out_specs = [
            pl.BlockSpec((None, sp, tv), lambda b, j: (b, 0, j)),
            pl.BlockSpec((None, kp, tv), lambda b, j: (b, 0, j)),
        ]
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid=(n, nv), in_specs=in_specs, out_specs=out_specs,
            # 8 warps also for a narrow state when the (blk, d_k) q/k blocks are large (4 spilled 26 KB at 128 x 128)
            compiler_params=compiler_params(platform, interpret, None, max(kp * tv, blk * kp)), interpret=interpret,
            name="lightning_attn_fwd",
        )(rate, q, k, v, s0)
    kernel = functools.partial(_fwd_kernel_grid, blk=blk, seq_len=seq_len)
    in_specs = [
        pl.BlockSpec((None, 1, 1), lambda b, j, t: (b, 0, 0)),
        pl.BlockSpec((None, blk, kp), lambda b, j, t: (b, t, 0)),
        pl.BlockSpec((None, blk, kp), lambda b, j, t: (b, t, 0)),
        pl.BlockSpec((None, blk, tv), lambda b, j, t: (b, t, j)),
        pl.BlockSpec((None, kp, tv), lambda b, j, t: (b, 0, j)),
    ]
    out_specs = [
        pl.BlockSpec((None, blk, tv), lambda b, j, t: (b, t, j)),
        pl.BlockSpec((None, kp, tv), lambda b, j, t: (b, 0, j)),  # resident across t, written at the end
    ]
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(n, nv, nblocks), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((kp, tv), F32)],
        compiler_params=compiler_params(platform, interpret, (PAR, PAR, SEQ)),
        interpret=interpret, name="lightning_attn_fwd",
    )(rate, q, k, v, s0)


def lightning_bwd(q, k, v, rate, s0, do, dst, *, seq_len: int, blk: int, platform: str, interpret: bool = False,
                  v_tile: int | None = None):
    """Backward kernels. Shapes as lightning_fwd plus do: [B*H, Sp, Wp], dst (final-state cotangent): [B*H, Kp, Wp].

    Every kernel runs per d_v tile of width tv, nt = Wp // tv tiles: dv and d_initial_state columns depend only
    on their tile, while dq and dk are sums over tiles, returned as per-tile partials for the caller to sum. The
    block and tile are `bwd_tiles(...)` (the block may be smaller than `blk`, which must divide Sp); `v_tile`
    forces the tile and keeps `blk` (tests, measurements).

    Returns (dq [nt, B*H, Sp, Kp], dk [nt, B*H, Sp, Kp] (in the input dtypes when nt == 1, else float32
    partials), dv [B*H, Sp, Wp] in v's dtype, d_initial_state [B*H, Kp, Wp] f32).
    """
    check_platform(platform)
    n, sp, kp = q.shape
    vp = v.shape[-1]
    if v_tile is None:
        blk, tv = bwd_tiles(platform, blk, kp, vp, q.dtype.itemsize)
    else:
        tv = v_tile
    _check_tiles("lightning_bwd", sp, blk, vp, tv)
    nblocks = sp // blk
    nt = vp // tv
    parts = lambda dtype: jax.ShapeDtypeStruct((nt, n, sp, kp), dtype if nt == 1 else F32)

    # 1) intra-block part: independent per (row, d_v tile, block); q k^T is recomputed per tile.
    blk_k = pl.BlockSpec((None, blk, kp), lambda b, j, t: (b, t, 0))
    blk_v = pl.BlockSpec((None, blk, tv), lambda b, j, t: (b, t, j))
    blk_kp = pl.BlockSpec((None, None, blk, kp), lambda b, j, t: (j, b, t, 0))  # per-tile partials
    rate3 = pl.BlockSpec((None, 1, 1), lambda b, j, t: (b, 0, 0))
    dqi, dki, dvi = pl.pallas_call(
        functools.partial(_bwd_intra_kernel, blk=blk, dot=matmul(platform)),
        out_shape=(parts(F32), parts(F32), jax.ShapeDtypeStruct((n, sp, vp), F32)),
        grid=(n, nt, nblocks), in_specs=[rate3, blk_k, blk_k, blk_v, blk_v], out_specs=[blk_kp, blk_kp, blk_v],
        # three f32 (blk, d) results: 8 warps from 128 x 64 up (4 spilled 8 KB at block 128, d 128 on an H100)
        compiler_params=compiler_params(platform, interpret, (PAR, PAR, PAR), blk * kp),
        interpret=interpret, name="lightning_attn_bwd_intra",
    )(rate, q, k, v, do)

    dq_shape = parts(q.dtype)
    dkdv_shape = (parts(k.dtype), jax.ShapeDtypeStruct((n, sp, vp), v.dtype), jax.ShapeDtypeStruct((n, kp, vp), F32))
    if platform == "triton":
        full_k = pl.BlockSpec((None, sp, kp), lambda b, j: (b, 0, 0))
        tile_v = pl.BlockSpec((None, sp, tv), lambda b, j: (b, 0, j))
        part_k = pl.BlockSpec((None, None, sp, kp), lambda b, j: (j, b, 0, 0))
        state = pl.BlockSpec((None, kp, tv), lambda b, j: (b, 0, j))
        rate_spec = pl.BlockSpec((None, 1, 1), lambda b, j: (b, 0, 0))
        params = compiler_params(platform, interpret, None, kp * tv)
        dq = pl.pallas_call(
            functools.partial(_dq_kernel_loop, blk=blk, seq_len=seq_len, nblocks=nblocks),
            out_shape=dq_shape, grid=(n, nt), in_specs=[rate_spec, full_k, tile_v, tile_v, state, part_k],
            out_specs=part_k, compiler_params=params, interpret=interpret, name="lightning_attn_bwd_dq",
        )(rate, k, v, do, s0, dqi)
        dk, dv, ds0 = pl.pallas_call(
            functools.partial(_dkdv_kernel_loop, blk=blk, seq_len=seq_len, nblocks=nblocks),
            out_shape=dkdv_shape, grid=(n, nt),
            in_specs=[rate_spec, full_k, full_k, tile_v, tile_v, state, part_k, tile_v],
            out_specs=[part_k, tile_v, state], compiler_params=params, interpret=interpret,
            name="lightning_attn_bwd_dkdv",
        )(rate, q, k, v, do, dst, dki, dvi)
        return dq, dk, dv, ds0

    seq = (PAR, PAR, SEQ)
    fwd_k = pl.BlockSpec((None, blk, kp), lambda b, j, t: (b, t, 0))
    fwd_v = pl.BlockSpec((None, blk, tv), lambda b, j, t: (b, t, j))
    fwd_kp = pl.BlockSpec((None, None, blk, kp), lambda b, j, t: (j, b, t, 0))
    state = pl.BlockSpec((None, kp, tv), lambda b, j, t: (b, 0, j))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel_grid, blk=blk, seq_len=seq_len),
        out_shape=dq_shape, grid=(n, nt, nblocks), in_specs=[rate3, fwd_k, fwd_v, fwd_v, state, fwd_kp],
        out_specs=fwd_kp, scratch_shapes=[pltpu.VMEM((kp, tv), F32)],
        compiler_params=compiler_params(platform, interpret, seq), interpret=interpret, name="lightning_attn_bwd_dq",
    )(rate, k, v, do, s0, dqi)
    last = nblocks - 1
    rev_k = pl.BlockSpec((None, blk, kp), lambda b, j, i: (b, last - i, 0))
    rev_v = pl.BlockSpec((None, blk, tv), lambda b, j, i: (b, last - i, j))
    rev_kp = pl.BlockSpec((None, None, blk, kp), lambda b, j, i: (j, b, last - i, 0))
    dk, dv, ds0 = pl.pallas_call(
        functools.partial(_dkdv_kernel_grid, blk=blk, seq_len=seq_len),
        out_shape=dkdv_shape, grid=(n, nt, nblocks),
        in_specs=[rate3, rev_k, rev_k, rev_v, rev_v, state, rev_kp, rev_v],
        out_specs=[rev_kp, rev_v, state], scratch_shapes=[pltpu.VMEM((kp, tv), F32)],
        compiler_params=compiler_params(platform, interpret, seq), interpret=interpret, name="lightning_attn_bwd_dkdv",
    )(rate, q, k, v, do, dst, dki, dvi)
    return dq, dk, dv, ds0
