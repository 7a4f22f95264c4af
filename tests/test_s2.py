"""S2-Attention: the block pattern, the op's impls against dense masked attention, LSE merging, the mixers and the
pruned decode cache."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import full_and_stepped_logits
from jaxeff.config import load_config
from pallas_kernels.s2_attention import block_mask, check_coverage, expand_to_tokens, kept_kv_blocks, s2_attention
from pallas_kernels.s2_attention.reference import dense_attention, merge_partitions


# ---------------------------------------------------------------------------------------------- pattern


def test_block_mask_matches_the_rule_and_a_hand_checked_case():
    # 4 heads, 8 blocks, local 2, stride 4 (step 1): the last query block reads these KV blocks per head
    # (also what the authors' library gives for this case)
    mask = block_mask(4, 8, 8, local_blocks=2, vert_stride=4)
    assert [list(np.nonzero(mask[h, -1])[0]) for h in range(4)] == [[0, 4, 6, 7], [3, 6, 7], [2, 6, 7], [1, 5, 6, 7]]
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, n, local, stride = (int(rng.integers(1, 7)), int(rng.integers(1, 12)), int(rng.integers(1, 4)),
                               int(rng.integers(1, 7)))
        step, offset, sink, dense = (int(rng.integers(0, 3)), int(rng.integers(0, 5)), int(rng.integers(0, 3)),
                                     int(rng.integers(0, h + 1)))
        m = block_mask(h, n, n, local_blocks=local, vert_stride=stride, head_sliding_step=step, head_offset=offset,
                       sink_blocks=sink, num_dense_heads=dense)
        for g in range(h):
            for i in range(n):
                for j in range(n):
                    rule = j <= i and (i - j < local or (j + g * step + offset) % stride == 0 or j < sink
                                       or g >= h - dense)
                    assert m[g, i, j] == rule, (h, n, local, stride, step, offset, sink, dense, g, i, j)


def test_gqa_step_divides_by_query_heads_and_dense_heads_are_last():
    # 2 KV heads for 8 query heads, stride 8: step = 8 // 8 = 1 (not 8 // 2 = 4)
    mask = block_mask(2, 16, 16, local_blocks=1, vert_stride=8, num_q_heads=8)
    assert list(np.nonzero(mask[1, -1])[0]) == [7, 15]  # (j + 1) % 8 == 0, plus the diagonal
    dense = block_mask(3, 6, 6, local_blocks=1, vert_stride=4, num_dense_heads=1)
    np.testing.assert_array_equal(dense[2], np.tril(np.ones((6, 6), bool)))


def test_coverage_check_warns_only_when_residues_are_missing():
    full = block_mask(8, 32, 32, local_blocks=2, vert_stride=8)  # step 1, 8 heads: all residues
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_coverage(full, "here") == 0
    half = block_mask(4, 32, 32, local_blocks=2, vert_stride=8)  # step 2: residues 0, 2, 4, 6 only
    with pytest.warns(UserWarning, match="causal blocks are read by no head"):
        assert check_coverage(half, "here") > 0


def test_retained_blocks_match_the_closed_form():
    n, local, stride, heads = 40, 3, 5, 5
    mask = block_mask(heads, n, n, local_blocks=local, vert_stride=stride)
    i = n - 1
    for g, kept in enumerate(kept_kv_blocks(mask)):
        first = (-g) % stride  # the first block of head g's residue class (step 1)
        vertical_outside_window = (i - local - first) // stride + 1 if i - local >= first else 0
        assert kept == local + vertical_outside_window


# ---------------------------------------------------------------------------------------------- op


def _qkv(b=2, s=70, hq=4, g=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32) for h in (hq, g, g)]


@pytest.mark.parametrize("kw", [
    {"local_blocks": 1, "vert_stride": 2},
    {"local_blocks": 2, "vert_stride": 3, "num_dense_heads": 1},
    {"local_blocks": 1, "vert_stride": None, "sink_blocks": 1},
])
def test_xla_impl_equals_dense_masked_attention_forward_and_gradients(kw):
    q, k, v = _qkv()
    mask = block_mask(2, 5, 5, num_q_heads=4, **kw)
    ref_out, ref_lse = dense_attention(q, k, v, expand_to_tokens(mask, 70, 16))
    out, lse = jax.jit(lambda q, k, v: s2_attention(q, k, v, block_size=16, impl="xla", return_lse=True, **kw))(q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)
    ct = jax.random.normal(jax.random.key(3), q.shape)
    grads = [jax.grad(lambda q, k, v: jnp.sum(s2_attention(q, k, v, block_size=16, impl=impl, **kw) * ct),
                      argnums=(0, 1, 2))(q, k, v) for impl in ("xla", "reference")]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_all_ones_pattern_is_dense_causal_attention():
    q, k, v = _qkv(s=48, hq=2, g=2)
    out = s2_attention(q, k, v, block_size=16, local_blocks=3, vert_stride=1, impl="xla")
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5)


def test_lse_merge_of_two_kv_partitions_is_full_attention():
    q, k, v = _qkv(s=32, hq=2, g=2)
    s = 32
    first = np.zeros((1, s, s), bool)
    first[:, :, :13] = True
    causal = np.tril(np.ones((1, s, s), bool))
    out_a, lse_a = dense_attention(q, k, v, causal & first)
    out_b, lse_b = dense_attention(q, k, v, causal & ~first)
    # rows with no key in a partition have lse -inf there; merging handles it
    out, lse = merge_partitions(out_a, lse_a, jnp.nan_to_num(out_b), lse_b)
    full_out, full_lse = dense_attention(q, k, v, causal)
    np.testing.assert_allclose(out, full_out, atol=1e-5)
    np.testing.assert_allclose(lse, full_lse, atol=1e-5)


def test_shape_errors_name_the_argument():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="k has shape"):
        s2_attention(q, k[:, :10], v, block_size=16, local_blocks=1, vert_stride=2)
    with pytest.raises(ValueError, match="whole number of query heads per KV head"):
        s2_attention(q[:, :, :3], k, v, block_size=16, local_blocks=1, vert_stride=2)


# ---------------------------------------------------------------------------------------------- mixers, decoding


def s2_model(pattern="[s2, attention]", **extra):
    over = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "model.mlp_dim": 64,
            "model.mixer_pattern": pattern, "model.s2.block_size": 4, "model.s2.local_blocks": 2,
            "model.s2.vert_stride": 3, "model.s2.impl": "xla", **extra}
    return load_config(None, [f"{k}={v}" for k, v in over.items()]).model


@pytest.mark.parametrize("pattern, extra", [("[s2, attention]", {}), ("[s2]", {"model.s2.num_dense_heads": 1}),
                                            ("[sink_window, s2]", {})])
def test_pruned_cache_decode_equals_the_full_forward(pattern, extra):
    cfg = s2_model(pattern, **extra)
    full, stepped, caches = full_and_stepped_logits(cfg, prompt=9, seq=30)
    np.testing.assert_allclose(stepped, full, atol=2e-5, rtol=2e-5)
    if pattern == "[s2, attention]":  # 30 tokens = 8 blocks: sink 0 + local 2 + ceil(8 / 3) vertical slots
        assert caches[0]["k"].shape == (2, 2, 2 + 3, 4, 8)


def test_decoding_keeps_exactly_the_blocks_each_head_reads_again():
    cfg = s2_model("[s2]")
    *_, = full_and_stepped_logits(cfg, prompt=9, seq=30)
    from jaxeff.layers.s2 import _Layout, s2_pattern

    layout = _Layout(cfg, s2_pattern, max_len=30)
    mask = block_mask(2, 8, 8, local_blocks=2, vert_stride=3, num_q_heads=4)
    # after the last query block, the slots that hold a block the head still reads = the closed-form count
    for g, kept in enumerate(kept_kv_blocks(mask)):
        slots = {int(layout.slot(jnp.asarray(j), jnp.asarray(g))) for j in np.nonzero(mask[g, -1])[0]}
        assert len(slots) == kept <= layout.capacity  # distinct slots: nothing still needed was overwritten


def test_cache_report_compares_with_a_dense_cache():
    from jaxeff.models.decoding import cache_report

    assert cache_report(s2_model("[attention]"), 64) is None
    report = cache_report(s2_model("[s2, attention]"), 64)  # 16 blocks: the s2 layer keeps 2 + ceil(16 / 3) = 8
    kv_bytes = 2 * 2 * 8 * 4  # k and v, 2 KV heads, head dim 8, float32: per token
    used = kv_bytes * (8 * 4 + 64) + 2 * 8 * 4 + 2 * 4  # + the s2 layer's block ids and both layers' indices
    dense = kv_bytes * 128 + 2 * 4
    assert report == (f"decode cache {used / 1024:,.1f} KiB for 64 tokens (a dense KV cache: {dense / 1024:,.1f} KiB, "
                      f"{used / dense:.0%})")


@pytest.mark.parametrize("pattern", [{"vert_stride": 2}, {"vert_stride": 3, "num_dense_heads": 1},
                                     {"vert_stride": None, "sink_blocks": 1}])
def test_pallas_impl_through_the_op_equals_the_reference(pattern):
    # the kernels themselves are tested in test_s2_kernels.py; this checks the op's custom VJP wiring (interpreter)
    # on a ragged length with GQA, dense heads mixed in, and sink blocks
    q, k, v = _qkv(b=1, s=40, hq=4, g=2, d=16, seed=4)
    kw = {"block_size": 16, "local_blocks": 1, **pattern}
    ct = jax.random.normal(jax.random.key(5), q.shape)
    results = {}
    for impl in ("pallas", "reference"):
        def loss(q, k, v, impl=impl):
            out, lse = s2_attention(q, k, v, impl=impl, return_lse=True, **kw)
            return jnp.sum(out * ct), lse
        results[impl] = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (val_p, lse_p), grads_p = results["pallas"]
    (val_r, lse_r), grads_r = results["reference"]
    np.testing.assert_allclose(val_p, val_r, rtol=1e-5)
    np.testing.assert_allclose(lse_p, lse_r, atol=1e-5)
    for a, b in zip(grads_p, grads_r):
        np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="power of two >= 16"):
        s2_attention(q, k, v, block_size=12, local_blocks=1, vert_stride=2, impl="pallas")


def test_fewer_query_blocks_are_the_latest_ones():
    full = block_mask(4, 10, 10, local_blocks=2, vert_stride=4)
    np.testing.assert_array_equal(block_mask(4, 3, 10, local_blocks=2, vert_stride=4), full[:, 7:])


def test_pallas_with_an_untileable_block_is_a_config_error():
    from jaxeff.config import ConfigError, check_consistency

    cfg = load_config(None, ["model.mixer_pattern=[s2]", "model.s2.impl=pallas", "model.s2.block_size=12"])
    with pytest.raises(ConfigError, match=r"model.s2.impl=pallas needs a block_size that is a power of two >= 16"):
        check_consistency(cfg)
