"""S2-Attention Pallas kernels (pallas_kernels/s2_attention/kernel.py) in interpret mode against dense attention.

The block pattern is a tiny in-test copy of DKernel's rule (local window + vertical stride with a per-KV-head
residue), expanded to a token mask for a dense masked-softmax reference in float32. Checked: forward out and lse,
dq/dk/dv from s2_backward against jax.grad of the dense reference (random cotangent for out, none for lse), both
kernel bodies ("triton", "tpu") in the generic CPU interpreter (the "tpu" body also in the TPU-semantics
interpreter), GQA (H=4, G=2 KV heads), S not a multiple of the block (partial last block), head dims that need padding,
bfloat16, the CSR/CSC builders, and lowering of the real kernels for GPU (Triton) and TPU (Mosaic) from this CPU.
Shapes are tiny and each kernel is jitted once per configuration, so the file stays well under a minute.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.s2_attention import kernel

BS = 16
FWD_TOL, GRAD_TOL, BF16_TOL = 1e-5, 1e-4, 2e-2

# name -> (B, S, H, G, K, pattern); S % BS != 0 in both (partial last block)
CASES = {
    "sparse_gqa": (2, 72, 4, 2, 32, "sparse"),  # 5 query blocks, the last one 8 rows; R = 2
    "dense_mha": (1, 40, 4, 4, 16, "ones"),  # 3 query blocks, the last one 8 rows; R = 1
}


# --------------------------------------------------------------------------------------------------------------
# Pattern, reference, inputs
# --------------------------------------------------------------------------------------------------------------


def block_pattern(hkv: int, nq: int, kind: str, local: int = 1, stride: int = 2) -> np.ndarray:
    """bool [G, I, J]: block (i, j) of KV head g kept iff j <= i and (i - j < local or (j + g) % stride == 0);
    "ones": every causal block."""
    i, j = np.arange(nq)[:, None], np.arange(nq)[None, :]
    g = np.arange(hkv)[:, None, None]
    causal = np.broadcast_to(j <= i, (hkv, nq, nq))
    if kind == "ones":
        return causal.copy()
    return causal & ((i - j < local) | ((j + g) % stride == 0))


def token_mask(bm: np.ndarray, s: int) -> np.ndarray:
    """bool [G, S, T]: the block mask expanded to tokens, causal inside the diagonal blocks."""
    dense = np.kron(bm, np.ones((BS, BS), bool))[:, :s, :s]
    return dense & np.tril(np.ones((s, s), bool))


def dense_attention(q, k, v, mask, scale):
    """Masked softmax attention in float32. q [B,S,H,K], k/v [B,S,G,K], mask [G,S,T] -> (out, lse [B,H,S])."""
    r = q.shape[2] // k.shape[2]  # query heads per KV head
    k, v = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
    mask = jnp.repeat(jnp.asarray(mask), r, axis=0)[None]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * scale
    s = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, precision="highest"), lse


@functools.lru_cache(maxsize=None)
def case(name: str):
    b, s, hq, hkv, d, kind = CASES[name]
    bm = block_pattern(hkv, -(-s // BS), kind)
    rng = np.random.default_rng(sum(map(ord, name)))
    a = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q, k, v, do = a(b, s, hq, d), a(b, s, hkv, d), a(b, s, hkv, d), a(b, s, hq, d)
    return dict(q=q, k=k, v=v, do=do, bm=bm, mask=token_mask(bm, s), scale=d ** -0.5,
                csr=kernel.csr_from_mask(bm), csc=kernel.csc_from_mask(bm))


@functools.lru_cache(maxsize=None)
def reference(name: str):
    c = case(name)
    ref = functools.partial(dense_attention, mask=c["mask"], scale=c["scale"])
    out, lse = jax.jit(ref)(c["q"], c["k"], c["v"])
    loss = lambda q, k, v: jnp.sum(ref(q, k, v)[0] * c["do"])  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(c["q"], c["k"], c["v"])
    return out, lse, grads


@functools.lru_cache(maxsize=None)
def kernels(platform: str, scale: float, interpret=True):
    kw = dict(block_size=BS, scale=scale, platform=platform, interpret=interpret)
    return jax.jit(functools.partial(kernel.s2_forward, **kw)), jax.jit(functools.partial(kernel.s2_backward, **kw))


@functools.lru_cache(maxsize=None)
def run(name: str, platform: str, dtype=jnp.float32, interpret=True):
    """Kernel forward, then backward from the kernel's own (out, lse), as the op's custom VJP does."""
    c = case(name)
    fwd, bwd = kernels(platform, c["scale"], interpret)
    q, k, v, do = (c[x].astype(dtype) for x in ("q", "k", "v", "do"))
    out, lse = fwd(q, k, v, *c["csr"])
    grads = bwd(q, k, v, out, lse, do, *c["csr"], *c["csc"])
    return out, lse, grads


def close(x, ref, tol):
    assert x.shape == ref.shape
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(ref, np.float64), atol=tol, rtol=tol)


def normwise(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert x.shape == ref.shape and np.all(np.isfinite(x))
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------


def test_pattern_and_index_builders():
    bm = block_pattern(2, 5, "sparse")
    assert bm[0, 4].tolist() == [True, False, True, False, True]  # residue 0: even blocks + the diagonal
    assert bm[1, 4].tolist() == [False, True, False, True, True]  # residue 1: odd blocks + the diagonal
    idx, cnt = kernel.csr_from_mask(bm)
    assert idx.dtype == cnt.dtype == np.int32 and idx.shape == (2, 5, 3) and cnt.shape == (2, 5)
    assert cnt[0].tolist() == [1, 2, 2, 3, 3] and cnt[1].tolist() == [1, 1, 2, 2, 3]
    assert idx[0, 4].tolist() == [0, 2, 4] and idx[0, 1].tolist() == [0, 1, 1]  # padded with the last valid id
    assert idx[1, 1].tolist() == [1, 1, 1]
    assert idx[1, 2].tolist() == [1, 2, 2]
    qidx, qcnt = kernel.csc_from_mask(bm)
    assert qcnt[0].tolist() == [5, 1, 3, 1, 1] and qidx[0, 2].tolist() == [2, 3, 4, 4, 4]
    # Round trip: both lists describe exactly the mask.
    for h in range(2):
        for i in range(5):
            assert sorted(set(idx[h, i, :cnt[h, i]].tolist())) == np.nonzero(bm[h, i])[0].tolist()
            assert sorted(set(qidx[h, i, :qcnt[h, i]].tolist())) == np.nonzero(bm[h, :, i])[0].tolist()
    # An empty row: count 0, index 0.
    idx, cnt = kernel.csr_from_mask(np.zeros((1, 2, 2), bool))
    assert idx.shape == (1, 2, 1) and cnt.tolist() == [[0, 0]] and idx.tolist() == [[[0], [0]]]


def test_all_ones_pattern_is_dense_causal():
    """The all-ones block pattern expands to the plain causal mask, and the kernel then equals dense causal
    attention computed without any block logic."""
    c = case("dense_mha")
    s = c["q"].shape[1]
    assert np.array_equal(c["mask"], np.broadcast_to(np.tril(np.ones((s, s), bool)), c["mask"].shape))
    causal = jnp.tril(jnp.ones((s, s), bool))[None].repeat(c["k"].shape[2], axis=0)
    out_ref, lse_ref = dense_attention(c["q"], c["k"], c["v"], causal, c["scale"])
    out, lse, _ = run("dense_mha", "triton")
    close(out, out_ref, FWD_TOL)
    close(lse, lse_ref, FWD_TOL)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("platform", kernel.PLATFORMS)
def test_forward_matches_dense(platform, name):
    out, lse, _ = run(name, platform)
    out_ref, lse_ref, _ = reference(name)
    b, s, hq, _ = case(name)["q"].shape
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32 and lse.shape == (b, hq, s)
    close(out, out_ref, FWD_TOL)
    close(lse, lse_ref, FWD_TOL)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("platform", kernel.PLATFORMS)
def test_backward_matches_dense_grad(platform, name):
    _, _, grads = run(name, platform)
    c = case(name)
    for gname, g, ref, x in zip(("dq", "dk", "dv"), grads, reference(name)[2], (c["q"], c["k"], c["v"])):
        assert g.shape == x.shape and g.dtype == x.dtype, gname
        close(g, ref, GRAD_TOL)


def test_sparse_pattern_really_skips_blocks():
    """Sanity check of the test itself: the sparse pattern differs from dense causal attention."""
    c = case("sparse_gqa")
    s = c["q"].shape[1]
    causal = np.broadcast_to(np.tril(np.ones((s, s), bool)), c["mask"].shape)
    out_dense, _ = dense_attention(c["q"], c["k"], c["v"], causal, c["scale"])
    assert normwise(reference("sparse_gqa")[0], out_dense) > 1e-2


@pytest.mark.parametrize("platform", kernel.PLATFORMS)
def test_bfloat16_inputs(platform):
    """bf16 q, k, v, dout: out, dq, dk, dv come back in bf16 within bf16 rounding of the f32 reference."""
    out, lse, grads = run("sparse_gqa", platform, jnp.bfloat16)
    c = case("sparse_gqa")
    up = [c[x].astype(jnp.bfloat16).astype(jnp.float32) for x in ("q", "k", "v", "do")]
    ref = functools.partial(dense_attention, mask=c["mask"], scale=c["scale"])
    out_ref, lse_ref = ref(*up[:3])
    ref_grads = jax.grad(lambda q, k, v: jnp.sum(ref(q, k, v)[0] * up[3]), argnums=(0, 1, 2))(*up[:3])
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert normwise(out, out_ref) < BF16_TOL and normwise(lse, lse_ref) < BF16_TOL
    for g, r in zip(grads, ref_grads):
        assert g.dtype == jnp.bfloat16 and normwise(g, r) < BF16_TOL


def test_tpu_body_in_tpu_semantics_interpreter():
    """The "tpu" body under pltpu.InterpretParams (TPU memory spaces, DMAs, SMEM scalar prefetch)."""
    from jax.experimental.pallas import tpu as pltpu

    out, lse, grads = run("sparse_gqa", "tpu", interpret=pltpu.InterpretParams())
    out_ref, lse_ref, grads_ref = reference("sparse_gqa")
    close(out, out_ref, FWD_TOL)
    close(lse, lse_ref, FWD_TOL)
    for g, r in zip(grads, grads_ref):
        close(g, r, GRAD_TOL)


def test_bad_arguments_are_refused():
    c = case("dense_mha")
    q, k, v = c["q"], c["k"], c["v"]
    with pytest.raises(ValueError, match="platform"):
        kernel.s2_forward(q, k, v, *c["csr"], block_size=BS, scale=1.0, platform="cuda", interpret=True)
    with pytest.raises(ValueError, match="power-of-two"):
        kernel.s2_forward(q, k, v, *c["csr"], block_size=24, scale=1.0, platform="triton", interpret=True)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        kernel.s2_forward(q, k[:, :, :3], v[:, :, :3], *c["csr"], block_size=BS, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="kv_index"):
        kernel.s2_forward(q, k, v, c["csr"][0][:, :2], c["csr"][1][:, :2], block_size=BS, scale=1.0,
                          interpret=True)


@pytest.mark.parametrize("platform, target, marker", [("triton", "cuda", "__gpu$xla.gpu.triton"),
                                                      ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_gpu_and_tpu(platform, target, marker, dtype):
    """Forward + backward lower for the real backend (not interpret) from this CPU host. D = 20 pads to 32;
    S = 72 pads to 80 (the full-sequence Triton refs are not a power of two, the in-kernel arrays are); the
    sparse pattern has M = 3 entries (padded to 4 for Triton)."""
    b, s, hq, hkv, d = 2, 72, 4, 2, 20
    bm = block_pattern(hkv, -(-s // BS), "sparse")
    csr, csc = kernel.csr_from_mask(bm), kernel.csc_from_mask(bm)
    kw = dict(block_size=BS, scale=d ** -0.5, platform=platform, interpret=False)

    def fwd_bwd(q, k, v, do):
        out, lse = kernel.s2_forward(q, k, v, *csr, **kw)
        return out, lse, kernel.s2_backward(q, k, v, out, lse, do, *csr, *csc, **kw)

    x = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    text = jax.jit(fwd_bwd).trace(x(b, s, hq, d), x(b, s, hkv, d), x(b, s, hkv, d), x(b, s, hq, d)).lower(
        lowering_platforms=(target,)).as_text()
    assert text.count(marker) == 3  # forward, dq, dk/dv


@pytest.mark.parametrize("impl", ["auto", "pallas"])
@pytest.mark.parametrize("target, marker, other", [("cuda", "__gpu$xla.gpu.triton", "tpu_custom_call"),
                                                   ("tpu", "tpu_custom_call", "__gpu$xla.gpu.triton")])
def test_the_op_picks_the_kernel_variant_when_lowering(impl, target, marker, other):
    """Through the public op, forward + backward lowered for a platform this CPU host is not: the variant follows
    the lowering platform (a trace-time choice would emit the Triton body for a TPU)."""
    from pallas_kernels.s2_attention import s2_attention

    b, s, hq, hkv, d = 1, 64, 4, 2, 32
    x = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731

    def loss(q, k, v):
        out = s2_attention(q, k, v, block_size=BS, local_blocks=1, vert_stride=2, impl=impl)
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x(b, s, hq, d), x(b, s, hkv, d), x(b, s, hkv, d)).lower(
        lowering_platforms=(target,)).as_text()
    assert text.count(marker) == 3 and other not in text  # forward, dq, dk/dv
