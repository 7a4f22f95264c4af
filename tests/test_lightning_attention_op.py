"""Lightning attention op: reference = chunked = recurrent steps = Pallas (interpreted), forward and gradients,
ragged lengths, decay regimes, initial/final state, float64, input checks, and GPU/TPU lowering of the kernels.

Shapes are tiny on purpose: every interpreted pallas_call costs about a second to compile on a 2-core CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallas_kernels.lightning_attention import lightning_attention, lightning_attention_step

RATES = {
    "weak": [1e-3, 2e-3],
    "strong": [2.0, 1.5],
    "mixed": [1e-3, 2.0],
}
# (impl, pallas_variant): "triton" / "tpu" are the two kernel variants, both run by the interpreter on CPU.
FAST_IMPLS = [("chunked", None), ("auto", None), ("pallas", "triton"), ("pallas", "tpu")]


def _inputs(seed, b=2, s=37, h=2, dk=16, dv=8, rates=RATES["mixed"]):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (b, s, h, dk), jnp.float32) * 0.5
    k = jax.random.normal(ks[1], (b, s, h, dk), jnp.float32) * 0.5
    v = jax.random.normal(ks[2], (b, s, h, dv), jnp.float32)
    s0 = jax.random.normal(ks[3], (b, h, dk, dv), jnp.float32)
    do = jax.random.normal(ks[4], (b, s, h, dv), jnp.float32)  # random cotangents, not sum()
    dst = jax.random.normal(ks[5], (b, h, dk, dv), jnp.float32)
    return q, k, v, jnp.asarray(rates, jnp.float32), s0, do, dst


def _close(actual, expected, rtol=1e-5, atol_scale=1e-6):
    expected = np.asarray(expected)
    atol = atol_scale * float(np.max(np.abs(expected)))
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


def _op(impl, variant=None, block_size=16):
    @jax.jit
    def f(q, k, v, rate, s0):
        return lightning_attention(q, k, v, rate, initial_state=s0, return_final_state=True, block_size=block_size,
                                   impl=impl, pallas_variant=variant)
    return f


@jax.jit
def _steps(q, k, v, rate, s0):
    """Token-by-token recurrence with lightning_attention_step (scan over the sequence)."""
    def body(state, x):
        o, state = lightning_attention_step(*x, rate, state)
        return state, o
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v))
    st, o = lax.scan(body, s0, xs)
    return jnp.moveaxis(o, 0, 1), st


def _grads(fn, do, dst):
    """d/d(q, k, v, s0, rate) of <o, do> + <final_state, dst>."""
    def loss(q, k, v, s0, rate):
        o, st = fn(q, k, v, rate, s0)
        return jnp.sum(o * do) + jnp.sum(st * dst)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


# ----------------------------------------------------------------------------------------------------------------
# Forward and gradients: every impl against the quadratic reference
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,regime,dk,dv", [(0, "mixed", 16, 8), (1, "weak", 12, 16), (2, "strong", 8, 12)])
def test_forward_all_impls_match_reference(seed, regime, dk, dv):
    q, k, v, rate, s0, _, _ = _inputs(seed, dk=dk, dv=dv, rates=RATES[regime])  # seq 37 = 2 blocks of 16 + 5
    o_ref, st_ref = _op("reference")(q, k, v, rate, s0)
    assert o_ref.shape == (2, 37, 2, dv) and st_ref.shape == (2, 2, dk, dv) and st_ref.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(st_ref))) > 0.1  # a state that padding-decay bugs would visibly change
    o_rec, st_rec = _steps(q, k, v, rate, s0)
    _close(o_rec, o_ref)
    _close(st_rec, st_ref)
    for impl, variant in FAST_IMPLS:
        o, st = _op(impl, variant)(q, k, v, rate, s0)
        assert o.dtype == q.dtype and st.dtype == jnp.float32
        _close(o, o_ref)
        _close(st, st_ref)


@pytest.mark.parametrize("seed,regime", [(3, "mixed"), (4, "strong")])
def test_gradients_all_impls_match_reference(seed, regime):
    q, k, v, rate, s0, do, dst = _inputs(seed, dk=16, dv=8, rates=RATES[regime])
    g_ref = _grads(_op("reference"), do, dst)(q, k, v, s0, rate)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in g_ref[:4])
    candidates = [("steps", _steps)] + [(f"{i}/{p}", _op(i, p)) for i, p in FAST_IMPLS]
    for name, fn in candidates:
        g = _grads(fn, do, dst)(q, k, v, s0, rate)
        for what, a, e in zip(("dq", "dk", "dv", "d_initial_state"), g[:4], g_ref[:4]):
            try:
                _close(a, e)
            except AssertionError as err:
                raise AssertionError(f"{name}: {what} differs from the reference") from err
        # rate is a fixed schedule: stop_gradient at the op entry, identical for every impl.
        np.testing.assert_array_equal(np.asarray(g[4]), 0.0)
    np.testing.assert_array_equal(np.asarray(g_ref[4]), 0.0)


def test_gradients_without_initial_or_final_state():
    """Default call (no initial_state, output only): gradients of q, k, v through chunked and Pallas."""
    q, k, v, rate, _, do, _ = _inputs(5, b=1, s=21, dk=16, dv=16)

    def grads(impl, variant=None):
        def loss(q, k, v):
            return jnp.sum(lightning_attention(q, k, v, rate, block_size=16, impl=impl, pallas_variant=variant) * do)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    g_ref = grads("reference")
    for impl, variant in (("chunked", None), ("pallas", "triton")):
        for a, e in zip(grads(impl, variant), g_ref):
            _close(a, e)


# ----------------------------------------------------------------------------------------------------------------
# Ragged lengths, block sizes, prefill + decode
# ----------------------------------------------------------------------------------------------------------------


def test_ragged_length_padding_changes_nothing():
    """seq 37 run alone equals the first 37 tokens of a 48-token run; the final state at 37 equals the
    recurrence's, for several block sizes (padding must not decay the state)."""
    q, k, v, rate, s0, _, _ = _inputs(6, b=1, s=48, rates=[0.7, 2.0])
    cut = 37
    o_full, _ = _op("chunked", block_size=16)(q, k, v, rate, s0)
    _, st_rec = _steps(q[:, :cut], k[:, :cut], v[:, :cut], rate, s0)
    for impl, variant, blk in [("chunked", None, 16), ("chunked", None, 5), ("chunked", None, 64),
                               ("pallas", "triton", 16), ("pallas", "tpu", 32)]:
        o, st = _op(impl, variant, blk)(q[:, :cut], k[:, :cut], v[:, :cut], rate, s0)
        _close(o, o_full[:, :cut])
        _close(st, st_rec)


def test_prefill_then_decode_matches_full_sequence():
    q, k, v, rate, s0, _, _ = _inputs(7, b=2, s=29, rates=[0.05, 1.0])
    o_full, st_full = _op("chunked")(q, k, v, rate, s0)
    n0 = 19
    o_pre, state = _op("pallas", "triton")(q[:, :n0], k[:, :n0], v[:, :n0], rate, s0)
    outs = [o_pre]
    step = jax.jit(lightning_attention_step)
    for t in range(n0, q.shape[1]):
        o_t, state = step(q[:, t], k[:, t], v[:, t], rate, state)
        outs.append(o_t[:, None])
    _close(jnp.concatenate(outs, axis=1), o_full)
    _close(state, st_full)


def _x64_context():
    """float64 on for one block: jax.enable_x64(True) here; jax.experimental.enable_x64() on versions with it."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    try:
        from jax.experimental import enable_x64
    except ImportError:
        pytest.skip("this jax has no enable_x64 context manager")
    return enable_x64()


def test_float64_reference_matches_chunked():
    with _x64_context():
        q, k, v, rate, s0, _, _ = (x.astype(jnp.float64) for x in _inputs(8, rates=RATES["mixed"]))
        o_ref, st_ref = lightning_attention(q, k, v, rate, initial_state=s0, return_final_state=True,
                                            impl="reference")
        o, st = lightning_attention(q, k, v, rate, initial_state=s0, return_final_state=True, block_size=16,
                                    impl="chunked")
        assert o.dtype == jnp.float64 and st.dtype == jnp.float64
        _close(o, o_ref, rtol=1e-12, atol_scale=1e-13)
        _close(st, st_ref, rtol=1e-12, atol_scale=1e-13)


# ----------------------------------------------------------------------------------------------------------------
# Head-dim tiling: the kernels split d_v over a grid axis (dq, dk summed from per-tile partials) and may use a
# smaller block than the op's, so one program fits an H100's shared memory / a TPU's VMEM
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["triton", "tpu"])
@pytest.mark.parametrize("dk,dv,tv,blk", [(16, 64, 16, 16), (32, 48, 32, 32)])
def test_dv_tiles_and_a_smaller_kernel_block_match_the_reference(monkeypatch, variant, dk, dv, tv, blk):
    """Forced tiles: d_v 64 in 4 tiles of 16 with the kernel block halved (32 -> 16), and d_v 48 (padded to 64)
    in 2 tiles of 32; ragged length 37, initial and final state, forward and gradients, both kernel variants."""
    from pallas_kernels.lightning_attention import kernel

    monkeypatch.setattr(kernel, "fwd_tiles", lambda platform, b, kp, vp, itemsize: (blk, tv))
    monkeypatch.setattr(kernel, "bwd_tiles", lambda platform, b, kp, vp, itemsize: (blk, tv))
    partials = []
    bwd = kernel.lightning_bwd

    def spy(*args, **kwargs):
        out = bwd(*args, **kwargs)
        partials.append((out[0].shape, out[0].dtype, out[1].shape))
        return out

    monkeypatch.setattr(kernel, "lightning_bwd", spy)
    q, k, v, rate, s0, do, dst = _inputs(12, dk=dk, dv=dv)
    o_ref, st_ref = _op("reference")(q, k, v, rate, s0)
    o, st = _op("pallas", variant, block_size=32)(q, k, v, rate, s0)
    _close(o, o_ref)
    _close(st, st_ref)
    g_ref = _grads(_op("reference"), do, dst)(q, k, v, s0, rate)
    g = _grads(_op("pallas", variant, block_size=32), do, dst)(q, k, v, s0, rate)
    for what, a, e in zip(("dq", "dk", "dv", "d_initial_state"), g[:4], g_ref[:4]):
        try:
            _close(a, e)
        except AssertionError as err:
            raise AssertionError(f"{what} differs from the reference") from err
    # the backward really ran per tile: float32 partials [tiles, B*H, Sp, Kp] (64 // tv tiles, Sp = 37 padded to
    # the op's block of 32 = 64 rows); traced once per lax.platform_dependent branch
    kp = max(16, dk)
    assert partials and set(partials) == {((64 // tv, 4, 64, kp), jnp.dtype(jnp.float32), (64 // tv, 4, 64, kp))}


def test_one_tile_partials_keep_the_input_dtype():
    """A single d_v tile (the common case) writes dq/dk in the input dtype, no float32 partials to sum."""
    from pallas_kernels.lightning_attention import kernel

    n, sp, kp, vp = 2, 32, 16, 16
    x = jnp.ones((n, sp, kp), jnp.bfloat16)
    w = jnp.ones((n, sp, vp), jnp.bfloat16)
    st = jnp.zeros((n, kp, vp), jnp.float32)
    dq, dk, dv, ds0 = kernel.lightning_bwd(x, x, w, jnp.full((n, 1, 1), 0.5), st, w, st, seq_len=30, blk=16,
                                           platform="triton", interpret=True)
    assert dq.shape == dk.shape == (1, n, sp, kp) and dq.dtype == dk.dtype == jnp.bfloat16
    assert dv.shape == (n, sp, vp) and dv.dtype == jnp.bfloat16 and ds0.shape == (n, kp, vp)


# (kernel, block, d_k, d_v tile, itemsize, bytes), each kernel compiled alone for an H100 (sm_90, jax 0.10.2):
# XLA's "Shared memory size limit exceeded: requested N" (52 that did not fit) and the launch's dynamic shared memory
# read by pallas_kernels.gpu_resources (41 that did). kernel._triton_smem must bound them, tightly.
SMEM_TOO_BIG = [
    ("dkdv", 64, 256, 128, 2, 294912), ("dkdv", 128, 128, 128, 2, 262144), ("dkdv", 64, 256, 256, 2, 458752),
    ("dkdv", 64, 128, 256, 2, 294912), ("dkdv", 128, 256, 64, 2, 360448), ("dkdv", 64, 512, 64, 2, 409600),
    ("dkdv", 64, 512, 32, 2, 335872), ("dkdv", 32, 512, 64, 2, 270336), ("dkdv", 16, 512, 128, 2, 335872),
    ("dkdv", 32, 128, 512, 2, 409600), ("dkdv", 64, 256, 128, 4, 393216), ("dkdv", 128, 128, 128, 4, 393216),
    ("dkdv", 32, 256, 128, 4, 262144), ("dkdv", 64, 128, 256, 4, 393216), ("dkdv", 32, 128, 512, 4, 491520),
    ("dkdv", 128, 64, 128, 4, 294912), ("dkdv", 16, 512, 64, 4, 237568), ("dq", 64, 256, 256, 2, 425984),
    ("dq", 128, 256, 128, 2, 327680), ("dq", 64, 512, 128, 2, 393216), ("dq", 64, 128, 256, 2, 278528),
    ("dq", 32, 256, 256, 2, 344064), ("dq", 128, 128, 256, 2, 425984), ("dq", 16, 512, 256, 2, 573440),
    ("dq", 64, 256, 128, 4, 294912), ("dq", 128, 128, 128, 4, 327680), ("dq", 128, 256, 64, 4, 327680),
    ("dq", 64, 128, 256, 4, 360448), ("dq", 32, 256, 256, 4, 393216), ("dq", 128, 128, 256, 4, 589824),
    ("dq", 64, 512, 64, 4, 311296), ("dq", 32, 512, 128, 4, 376832), ("dq", 16, 512, 256, 4, 606208),
    ("dq", 128, 64, 256, 4, 491520), ("dq", 64, 256, 256, 4, 524288), ("intra", 128, 256, 256, 2, 262144),
    ("intra", 128, 64, 512, 2, 294912), ("intra", 128, 256, 128, 4, 393216), ("intra", 64, 256, 256, 4, 262144),
    ("intra", 128, 128, 256, 4, 393216), ("fwd", 128, 256, 32, 2, 286720), ("fwd", 128, 512, 32, 2, 548864),
    ("fwd", 64, 512, 32, 2, 274432), ("fwd", 128, 256, 16, 2, 274432), ("fwd", 128, 256, 64, 2, 311296),
    ("fwd", 64, 512, 64, 2, 286720), ("fwd", 64, 512, 16, 2, 268288), ("fwd", 32, 512, 128, 2, 305152),
    ("fwd", 128, 256, 32, 4, 409600), ("fwd", 128, 256, 16, 4, 401408), ("fwd", 128, 256, 64, 4, 425984),
    ("fwd", 64, 512, 32, 4, 401408),
]
SMEM_FITTED = [
    ("intra", 64, 256, 64, 2, 106496), ("intra", 64, 256, 16, 2, 100352), ("intra", 128, 64, 16, 2, 53248),
    ("intra", 128, 16, 16, 2, 40960), ("intra", 32, 256, 32, 2, 51200), ("intra", 64, 128, 128, 2, 65536),
    ("intra", 128, 128, 64, 2, 98304), ("intra", 16, 128, 128, 2, 16384), ("intra", 32, 512, 32, 2, 100352),
    ("intra", 64, 64, 64, 2, 32768), ("intra", 128, 32, 32, 2, 49152), ("intra", 64, 256, 64, 4, 163840),
    ("intra", 128, 64, 16, 4, 139264), ("fwd", 64, 256, 32, 2, 143360), ("fwd", 128, 128, 32, 2, 155648),
    ("fwd", 64, 128, 32, 2, 77824), ("fwd", 32, 512, 32, 2, 104448), ("fwd", 128, 16, 16, 2, 28672),
    ("fwd", 16, 16, 16, 2, 3072), ("fwd", 64, 64, 32, 2, 45056), ("dq", 64, 256, 64, 2, 131072),
    ("dq", 32, 512, 32, 2, 106496), ("dq", 128, 128, 64, 2, 163840), ("dq", 128, 16, 16, 2, 28672),
    ("dq", 64, 64, 64, 2, 57344), ("dq", 16, 128, 128, 2, 86016), ("dq", 128, 64, 64, 2, 114688),
    ("dq", 128, 128, 32, 2, 131072), ("dq", 128, 32, 32, 2, 57344), ("dq", 64, 128, 64, 2, 81920),
    ("dq", 128, 64, 128, 2, 180224), ("dq", 64, 64, 16, 2, 32768), ("dq", 128, 128, 16, 2, 114688),
    ("dq", 64, 128, 16, 2, 57344), ("dq", 32, 128, 16, 2, 28672), ("dkdv", 64, 256, 64, 2, 212992),
    ("dkdv", 32, 512, 32, 2, 200704), ("dkdv", 128, 128, 64, 2, 196608), ("dkdv", 128, 16, 16, 2, 32768),
    ("dkdv", 64, 64, 64, 2, 65536), ("dkdv", 16, 128, 128, 2, 90112),
]


def test_triton_shared_memory_model_bounds_the_measured_use():
    from pallas_kernels.lightning_attention import kernel

    exact = 0
    for name, blk, kp, tv, itemsize, measured in SMEM_TOO_BIG + SMEM_FITTED:
        got = kernel._triton_smem(name, blk, kp, tv, itemsize)
        assert measured <= got <= 1.5 * measured, (name, blk, kp, tv, itemsize, got, measured)
        exact += got == measured
    assert exact >= 0.85 * len(SMEM_TOO_BIG + SMEM_FITTED), exact
    for name, blk, kp, tv, itemsize, measured in SMEM_TOO_BIG:
        assert kernel._triton_smem(name, blk, kp, tv, itemsize) > kernel.H100_SMEM


def test_tile_choice_fits_the_chip_and_keeps_small_heads_whole():
    from pallas_kernels.lightning_attention import kernel

    # small heads: the asked block and one backward tile (the forward's Triton tiles are 32 wide as before)
    assert kernel.bwd_tiles("triton", 64, 128, 128, 2) == (64, 128)
    assert kernel.fwd_tiles("triton", 64, 128, 128, 2) == (64, 32)
    assert kernel.bwd_tiles("tpu", 128, 128, 128, 2) == (128, 128)
    assert kernel.bwd_tiles("tpu", 128, 256, 512, 2) == (128, 512)  # v5e VMEM holds a 256 x 512 f32 state
    # the LRPE layer (d_k = 2 d_v) that exceeded H100 shared memory: d_v tiles of 64, block kept
    assert kernel.bwd_tiles("triton", 64, 256, 128, 2) == (64, 64)
    assert kernel.bwd_tiles("triton", 128, 256, 512, 2) == (64, 64)  # block 128 x d_k 256 fits no tile
    for platform in ("triton", "tpu"):
        for blk in (16, 32, 64, 128, 256):
            for kp in (16, 32, 64, 128, 256, 512):
                for vp in (16, 32, 64, 128, 256, 512) if platform == "triton" else (16, 64, 128, 256, 384, 512):
                    for itemsize in (2, 4):
                        for family, choose in (("fwd", kernel.fwd_tiles), ("bwd", kernel.bwd_tiles)):
                            b, tv = choose(platform, blk, kp, vp, itemsize)
                            case = (platform, family, blk, kp, vp, itemsize, b, tv)
                            assert blk % b == 0 and b >= 16 and vp % tv == 0, case
                            if platform == "tpu":
                                assert tv == vp or tv % 128 == 0, case
                                assert kernel._tpu_vmem(b, kp, tv, itemsize) <= kernel.TPU_VMEM, case
                            else:
                                assert tv & (tv - 1) == 0 and tv >= 16, case
                                kernels = ("fwd",) if family == "fwd" else ("intra", "dq", "dkdv")
                                for name in kernels:
                                    assert kernel._triton_smem(name, b, kp, tv, itemsize) <= kernel.H100_SMEM, case


# ----------------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors():
    q, k, v, rate, s0, _, _ = _inputs(9, b=1, s=8, dk=4, dv=6)
    cases = [
        (dict(q=q[0]), r"q has shape \(8, 2, 4\), expected \[batch, seq, heads, d_k\]"),
        (dict(k=k[:, :5]), r"k has shape \(1, 5, 2, 4\), expected .*\(1, 8, 2, 4\)"),
        (dict(v=v[:, :, :1]), r"v has shape \(1, 8, 1, 6\), expected .*\(1, 8, 2, d_v\)"),
        (dict(v=v[0]), r"v has shape \(8, 2, 6\)"),
        (dict(rate=rate[:1]), r"rate has shape \(1,\), expected \[heads\] = \(2,\)"),
        (dict(rate=rate[None]), r"rate has shape \(1, 2\)"),
        (dict(initial_state=s0[..., :3]), r"initial_state has shape \(1, 2, 4, 3\), expected .*\(1, 2, 4, 6\)"),
        (dict(impl="triton"), r"unknown impl='triton'; expected one of"),
        (dict(block_size=0), r"block_size must be a positive int"),
    ]
    for override, pattern in cases:
        args = dict(q=q, k=k, v=v, rate=rate, initial_state=s0, impl="chunked")
        args.update(override)
        with pytest.raises(ValueError, match=pattern):
            lightning_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("rate"), **args)
    with pytest.raises(ValueError, match=r"state has shape \(1, 2, 4, 5\), expected \(1, 2, 4, 6\)"):
        lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], rate, s0[..., :5])
    with pytest.raises(ValueError, match=r"rate has shape \(3,\), expected \(2,\)"):
        lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], jnp.ones(3), s0)


# ----------------------------------------------------------------------------------------------------------------
# GPU / TPU lowering from this CPU host
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform,marker", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")])
@pytest.mark.parametrize("impl", ["pallas", "auto"])
def test_kernels_lower_for_gpu_and_tpu(platform, marker, impl):
    sd = jax.ShapeDtypeStruct
    b, s, h, dk, dv = 2, 37, 2, 12, 20  # ragged length, non-power-of-two head dims (padded inside)
    args = (sd((b, s, h, dk), jnp.float32), sd((b, s, h, dk), jnp.float32), sd((b, s, h, dv), jnp.float32),
            sd((h,), jnp.float32), sd((b, h, dk, dv), jnp.float32), sd((b, s, h, dv), jnp.float32))

    def fwd(q, k, v, rate, s0, do):
        return lightning_attention(q, k, v, rate, initial_state=s0, return_final_state=True, block_size=16,
                                   impl=impl)

    def grad(q, k, v, rate, s0, do):
        def loss(q, k, v, s0):
            o, st = fwd(q, k, v, rate, s0, do)
            return jnp.sum(o * do) + jnp.sum(st)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s0)

    fwd_text = jax.jit(fwd).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert fwd_text.count(marker) == 1  # the forward kernel
    bwd_text = jax.jit(grad).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert bwd_text.count(marker) == 3  # intra-block, dq sweep, dk/dv sweep


def _numpy_oracle(q, k, v, rate, s0):
    """An independent oracle in float64 NumPy, written from the definition
    o_t = sum_{j <= t} exp(-rate (t - j)) (q_t . k_j) v_j + exp(-rate (t + 1)) q_t S0
    (the masked form of TransNormerLLM's reference `linear_attn`, plus the initial state), with a
    plain loop over positions and no shared code with the op."""
    q, k, v, s0 = (np.asarray(x, np.float64) for x in (q, k, v, s0))
    rate = np.asarray(rate, np.float64)
    b, n, h, _ = q.shape
    out = np.zeros((b, n, h, v.shape[-1]))
    for t in range(n):
        for j in range(t + 1):
            w = np.exp(-rate * (t - j))  # [h]
            out[:, t] += (np.einsum("bhk,bhk->bh", q[:, t], k[:, j]) * w)[..., None] * v[:, j]
        out[:, t] += np.einsum("bhk,bhkv->bhv", q[:, t], s0) * np.exp(-rate * (t + 1))[None, :, None]
    final = np.einsum("h,bhkv->bhkv", np.exp(-rate * n), s0)
    for j in range(n):
        final += np.exp(-rate * (n - 1 - j))[None, :, None, None] * np.einsum("bhk,bhv->bhkv", k[:, j], v[:, j])
    return out, final


@pytest.mark.parametrize("impl, variant", [("reference", None), ("chunked", None), ("pallas", "triton")])
def test_matches_an_independent_numpy_oracle(impl, variant):
    q, k, v, rate, s0, _, _ = _inputs(seed=11, s=21)
    o, st = _op(impl, variant)(q, k, v, rate, s0)
    o_ref, st_ref = _numpy_oracle(q, k, v, rate, s0)
    _close(o, o_ref)
    _close(st, st_ref)
