"""mLSTM Pallas kernels (pallas_kernels/mlstm/kernel.py) in interpret mode against the jnp reference.

Forward h and final state vs the exact quadratic oracle; gradients of sum(h*w) + sum(C*wc) + sum(n*wn) w.r.t.
q, k, v, i, f, C0, n0 vs jax.vjp of the chunkwise reference; both kernel bodies ("triton", "tpu") run by the CPU
interpreter; and lowering of the real kernels for GPU (Triton) and TPU (Mosaic) from this CPU host.
Shapes are tiny (S = 40 is not a multiple of the chunk 16; d_qk = 8 != d_v = 16, both padded inside); the head-dim
tiling runs with forced small tiles (2 d_qk tiles, 4 d_v tiles). Every kernel call is jitted once per body (and
tile setting), so the whole file takes about a minute and a half on 2 cores.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mlstm import kernel, reference

B, H, S, DK, DV = 2, 2, 40, 8, 16
CHUNK, EPS = 16, 1e-6
FWD_TOL, GRAD_TOL, DF_TOL = 1e-5, 1e-4, 5e-4  # normwise: max |err| / max |ref| (per output)
GRAD_NAMES = ("dq", "dk", "dv", "di", "df", "dc0", "dn0")

# (input-gate offset, non-zero initial state and final-state cotangents)
CASES = [(0.0, True), (-5.0, True), (-10.0, True), (0.0, False)]


def _inputs(offset: float, init: bool, seed: int = 0, dk: int = DK, dv: int = DV):
    rng = np.random.default_rng(seed)
    a = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q, k, v = a(B, H, S, dk), a(B, H, S, dk), a(B, H, S, dv)
    i, f = a(B, H, S) + offset, a(B, H, S) + 3.0  # forget gates near 0.95, as trained models have
    state = (a(B, H, dk, dv), a(B, H, dk), a(B, H)) if init else reference.zero_state(B, H, dk, dv)
    dh = a(B, H, S, dv)
    dc, dn = (a(B, H, dk, dv), a(B, H, dk)) if init else (jnp.zeros((B, H, dk, dv)), jnp.zeros((B, H, dk)))
    return (q, k, v, i, f, *state), (dh, dc, dn)


@functools.lru_cache(maxsize=None)
def _kernels(platform: str, tiles: int | None = None):
    """Jitted forward and backward kernels; `tiles` forces the d_qk and d_v tiles."""
    kw = dict(chunk=CHUNK, eps=EPS, platform=platform, interpret=True, block_v=tiles, block_k=tiles)
    return jax.jit(functools.partial(kernel.mlstm_fwd, **kw)), jax.jit(functools.partial(kernel.mlstm_bwd, **kw))


@jax.jit
def _quadratic(q, k, v, i, f, c0, n0, m0):
    return reference.quadratic(q, k, v, i, f, (c0, n0, m0), EPS)


@jax.jit
def _chunked_vjp(args, cts):
    *diff, m0 = args

    def fn(q, k, v, i, f, c0, n0):
        h, (c, n, _) = reference.chunked(q, k, v, i, f, (c0, n0, m0), CHUNK, EPS)
        return h, c, n  # no cotangent for the final m (the op stops its gradient)

    return jax.vjp(fn, *diff)[1](cts)


def _err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert x.shape == ref.shape
    assert np.all(np.isfinite(x))
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


@pytest.mark.parametrize("offset, init", CASES)
@pytest.mark.parametrize("platform", kernel.PLATFORMS)
def test_forward_matches_quadratic(platform, offset, init):
    args, _ = _inputs(offset, init)
    h, (c, n, m) = _kernels(platform)[0](*args)
    h_ref, (c_ref, n_ref, m_ref) = _quadratic(*args)
    assert h.dtype == args[2].dtype and c.dtype == n.dtype == m.dtype == jnp.float32
    for name, x, ref in (("h", h, h_ref), ("C", c, c_ref), ("n", n, n_ref), ("m", m, m_ref)):
        assert _err(x, ref) < FWD_TOL, name


@pytest.mark.parametrize("offset, init", CASES)
@pytest.mark.parametrize("platform", kernel.PLATFORMS)
def test_backward_matches_chunked_vjp(platform, offset, init):
    args, cts = _inputs(offset, init, seed=1)
    grads = _kernels(platform)[1](*args, *cts)
    refs = _chunked_vjp(args, cts)
    for name, g, ref, x in zip(GRAD_NAMES, grads, refs, args):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert _err(g, ref) < (DF_TOL if name == "df" else GRAD_TOL), name


def test_final_state_gradient_reaches_the_stabiliser():
    """With a loss on the final C only, the gate gradients are dominated by the path through m_final (the
    state is stored times exp(-m_final)); holding m fixed would get di/df wrong by O(1)."""
    args, (dh, dc, dn) = _inputs(-5.0, True, seed=2)
    cts = (jnp.zeros_like(dh), dc, jnp.zeros_like(dn))
    grads = _kernels("triton")[1](*args, *cts)
    refs = _chunked_vjp(args, cts)
    for name, g, ref in zip(GRAD_NAMES, grads, refs):
        assert _err(g, ref) < (DF_TOL if name == "df" else GRAD_TOL), name


def test_unknown_platform_is_refused():
    args, _ = _inputs(0.0, False)
    with pytest.raises(ValueError, match="platform"):
        kernel.mlstm_fwd(*args, chunk=CHUNK, eps=EPS, platform="cuda", interpret=True)


@pytest.mark.parametrize("platform, target, marker", [("triton", "cuda", "__gpu$xla.gpu.triton"),
                                                      ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_gpu_and_tpu(platform, target, marker, dtype):
    sd = jax.ShapeDtypeStruct
    dv = 20  # non-power-of-two d_v as well
    x, f32 = (lambda *shape: sd(shape, dtype)), (lambda *shape: sd(shape, jnp.float32))  # noqa: E731
    args = (x(B, H, S, DK), x(B, H, S, DK), x(B, H, S, dv), f32(B, H, S), f32(B, H, S), f32(B, H, DK, dv),
            f32(B, H, DK), f32(B, H), x(B, H, S, dv), f32(B, H, DK, dv), f32(B, H, DK))
    kw = dict(chunk=CHUNK, eps=EPS, platform=platform, interpret=False)

    def fwd_bwd(*a):
        return kernel.mlstm_fwd(*a[:8], **kw), kernel.mlstm_bwd(*a, **kw)

    text = jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=(target,)).as_text()
    # forward: states + outputs; backward: states again, prep, reverse states, dv, dq/dk
    assert text.count(marker) == 7


@pytest.mark.parametrize("offset", [0.0, -10.0])
@pytest.mark.parametrize("platform", kernel.PLATFORMS)
def test_head_dim_tiles(platform, offset):
    """Several d_qk and d_v tiles per row (forced small): d_qk 32 in 2 tiles of 16; d_v 40, padded to 64, in 4
    tiles of 16 (the last one all padding). Every kernel splits or sums over the tiles; the numbers must not
    change: forward vs the quadratic oracle, gradients (with a non-zero initial state and final-state
    cotangents, S = 40 not a multiple of the chunk 16) vs the chunked reference's VJP."""
    dk, dv = 32, 40
    tiles = kernel._tiles(kernel._pad_dim(dk, platform), kernel._pad_dim(dv, platform), platform, 16, 16)
    assert tiles == dict(ks=16, ws=16, kt=16, wt=16)
    args, cts = _inputs(offset, True, seed=5, dk=dk, dv=dv)
    fwd, bwd = _kernels(platform, tiles=16)
    h, (c, n, m) = fwd(*args)
    h_ref, (c_ref, n_ref, m_ref) = _quadratic(*args)
    for name, x, ref in (("h", h, h_ref), ("C", c, c_ref), ("n", n, n_ref), ("m", m, m_ref)):
        assert _err(x, ref) < FWD_TOL, name
    grads = bwd(*args, *cts)
    for name, g, ref, x in zip(GRAD_NAMES, grads, _chunked_vjp(args, cts), args):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert _err(g, ref) < (DF_TOL if name == "df" else GRAD_TOL), name


def test_default_tiles_cover_xlstm_7b_heads():
    """xLSTM 7B's heads (d_qk 256, d_v 512) are split per platform (see kernel._tiles)."""
    assert kernel._tiles(256, 512, "triton") == dict(ks=64, ws=64, kt=64, wt=64)
    assert kernel._tiles(128, 128, "triton") == dict(ks=64, ws=64, kt=64, wt=128)
    assert kernel._tiles(256, 512, "tpu") == dict(ks=256, ws=512, kt=256, wt=512)
    assert kernel._tiles(512, 1024, "tpu") == dict(ks=512, ws=256, kt=512, wt=256)


@pytest.mark.parametrize("chunk", [32, 64])  # 2 chunks; one chunk with 24 padded steps
def test_other_chunk_sizes(chunk):
    args, cts = _inputs(-5.0, True, seed=3)
    kw = dict(chunk=chunk, eps=EPS, platform="triton", interpret=True)
    h, (c, n, _) = jax.jit(functools.partial(kernel.mlstm_fwd, **kw))(*args)
    h_ref, (c_ref, n_ref, _) = _quadratic(*args)
    assert max(_err(h, h_ref), _err(c, c_ref), _err(n, n_ref)) < FWD_TOL
    grads = jax.jit(functools.partial(kernel.mlstm_bwd, **kw))(*args, *cts)
    for name, g, ref in zip(GRAD_NAMES, grads, _chunked_vjp(args, cts)):
        assert _err(g, ref) < (DF_TOL if name == "df" else GRAD_TOL), name


def test_bfloat16_inputs():
    """bf16 q, k, v (and dh): h and dq/dk/dv come back in bf16, within bf16 rounding of the f32 reference."""
    args, (dh, dc, dn) = _inputs(0.0, True, seed=4)
    low = tuple(x.astype(jnp.bfloat16) for x in args[:3]) + args[3:]
    h, _ = _kernels("triton")[0](*low)
    assert h.dtype == jnp.bfloat16
    up = tuple(x.astype(jnp.float32) for x in low)
    assert _err(h, _quadratic(*up)[0]) < 2e-2
    grads = _kernels("triton")[1](*low, dh.astype(jnp.bfloat16), dc, dn)
    refs = _chunked_vjp(up, (dh.astype(jnp.bfloat16).astype(jnp.float32), dc, dn))
    for name, g, ref, x in zip(GRAD_NAMES, grads, refs, low):
        assert g.dtype == x.dtype and _err(g, ref) < 2e-2, name
