"""InfLLM v2: the block selection against a NumPy reimplementation from the settings, the op's impls against dense
attention under the same mask (forward and gradients, ragged lengths, GQA), dense below dense_len, decoding from
the KV cache = the full forward, config errors, and a tiny model that trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import full_and_stepped_logits, tiny_config
from jaxeff.config import ConfigError, check_consistency, load_config
from pallas_kernels.infllm import infllm_attention, selection
from pallas_kernels.infllm import kernel
from pallas_kernels.infllm import reference as ref


def _qkv(b, s, hq, g, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, s, hq, d)), jax.random.normal(ks[1], (b, s, g, d)),
            jax.random.normal(ks[2], (b, s, g, d)))


def numpy_selection(q, k, *, block_size, kernel_size, kernel_stride, init_blocks, local_blocks, topk, dense_len=0):
    """Loops straight from the settings: pooled keys, per-head softmax over the pooled keys the query has seen in
    full, summed over the group, max over the pooled keys overlapping a block, then init + local + top-k."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, s, hq, d = q.shape
    g = k.shape[2]
    r = hq // g
    n_blocks = -(-s // block_size)
    starts = list(range(0, s - kernel_size + 1, kernel_stride))
    out = np.zeros((b, g, s, n_blocks), bool)
    for bi in range(b):
        for gi in range(g):
            pooled = [k[bi, c0:c0 + kernel_size, gi].mean(0) for c0 in starts]
            for t in range(s):
                i = t // block_size
                seen = [c for c, c0 in enumerate(starts) if c0 + kernel_size - 1 <= t]
                score = np.zeros(len(starts))
                for h in range(gi * r, gi * r + r):
                    if seen:
                        logits = np.array([q[bi, t, h] @ pooled[c] for c in seen]) / np.sqrt(d)
                        e = np.exp(logits - logits.max())
                        score[seen] += e / e.sum()
                blocks = {}
                for j in range(i + 1):
                    over = [score[c] for c, c0 in enumerate(starts)
                            if c0 < (j + 1) * block_size and c0 + kernel_size > j * block_size]
                    blocks[j] = max(over) if over else -np.inf
                fixed = {j for j in range(i + 1) if j < init_blocks or i - j < local_blocks or t + 1 < dense_len}
                others = sorted((j for j in blocks if j not in fixed and np.isfinite(blocks[j])),
                                key=lambda j: (-blocks[j], j))
                for j in fixed | set(others[:max(topk - init_blocks, 0)]):
                    out[bi, gi, t, j] = True
    return out


SETTINGS = [
    dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, local_blocks=1, topk=2),
    dict(block_size=8, kernel_size=8, kernel_stride=4, init_blocks=0, local_blocks=2, topk=3),
    dict(block_size=16, kernel_size=16, kernel_stride=4, init_blocks=2, local_blocks=1, topk=3, dense_len=40),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_selection_matches_a_numpy_reimplementation(settings):
    q, k, _ = _qkv(2, 83, 4, 2, 8, seed=1)  # 83: a ragged last block
    got = np.asarray(selection(q, k, **settings))
    want = numpy_selection(q, k, **settings)
    np.testing.assert_array_equal(got, want)
    causal = np.arange(got.shape[3])[None, :] <= np.arange(83)[:, None] // settings["block_size"]
    assert not (got & ~causal).any()
    assert got.sum() < 0.8 * causal.sum() * 4 or "dense_len" in settings  # really sparse


def test_the_overlap_rule_is_minicpm4s_max_pooling_window():
    # released code: block j pools kernels 4j - 1 .. 4j + 3 (window block/stride + 1, stride block/stride, pad 1)
    overlap = ref.kernel_block_overlap(40, 10, 32, 16, 64)
    for j in range(10):
        assert list(np.nonzero(overlap[:, j])[0]) == [c for c in range(4 * j - 1, 4 * j + 4) if 0 <= c < 40]


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_op_equals_dense_attention_under_the_same_mask(impl):
    s, bs = 75, 16  # ragged: 4 full blocks + 11
    q, k, v = _qkv(2, s, 4, 2, 16, seed=2)
    kw = dict(block_size=bs, kernel_size=8, kernel_stride=4, init_blocks=1, local_blocks=1, topk=2)
    mask = selection(q, k, **kw)
    ct = jax.random.normal(jax.random.key(3), q.shape)
    results = {}
    for name in (impl, "reference"):
        def loss(q, k, v, name=name):
            return jnp.sum(infllm_attention(q, k, v, impl=name, mask=mask, **kw) * ct)
        results[name] = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    tokens = ref.token_mask(mask, bs, s)
    plain = ref.dense_attention(q, k, v, tokens, 16 ** -0.5)  # the oracle is masked attention
    np.testing.assert_allclose(infllm_attention(q, k, v, impl="reference", mask=mask, **kw), plain, atol=1e-6)
    (val, grads), (val_r, grads_r) = results[impl], results["reference"]
    np.testing.assert_allclose(val, val_r, rtol=1e-5)
    for a, b in zip(grads, grads_r):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # the selection in the op (no mask given) is the same one
    np.testing.assert_allclose(infllm_attention(q, k, v, impl=impl, **kw),
                               infllm_attention(q, k, v, impl="reference", mask=mask, **kw), atol=1e-5)


def test_tpu_kernel_body_in_the_interpreter():
    s, bs, d = 40, 16, 16
    q, k, v = _qkv(1, s, 4, 2, d, seed=4)
    mask = selection(q, k, block_size=bs, kernel_size=8, kernel_stride=4, init_blocks=1, local_blocks=1, topk=1)
    dout = jax.random.normal(jax.random.key(5), q.shape)
    oracle = lambda q, k, v: ref.dense_attention(q, k, v, ref.token_mask(mask, bs, s), d ** -0.5)  # noqa: E731
    want, vjp = jax.vjp(oracle, q, k, v)
    kw = dict(block_size=bs, scale=d ** -0.5, platform="tpu", interpret=True)
    out, lse = kernel.infllm_forward(q, k, v, mask, **kw)
    np.testing.assert_allclose(out, want, atol=1e-5)
    for a, b in zip(kernel.infllm_backward(q, k, v, out, lse, dout, mask, **kw), vjp(dout)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_index_lists_visit_only_the_union_of_the_blocks_chosen():
    m = jnp.asarray([[[True, False, True, False], [False, False, False, False]]])
    idx, cnt = kernel.csr(m, "tpu")
    np.testing.assert_array_equal(cnt, [[2, 0]])
    np.testing.assert_array_equal(idx[0, 0], [0, 2, 2, 2])
    idx, _ = kernel.csr(m, "triton")
    assert idx.shape[-1] == 4


def test_dense_below_dense_len_is_plain_causal_attention():
    q, k, v = _qkv(1, 50, 4, 2, 8, seed=6)
    kw = dict(block_size=8, kernel_size=8, kernel_stride=4, init_blocks=1, local_blocks=1, topk=1)
    dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(infllm_attention(q, k, v, dense_len=51, impl="xla", **kw), dense, atol=1e-5)
    sparse = infllm_attention(q, k, v, dense_len=0, impl="xla", **kw)
    assert float(jnp.max(jnp.abs(sparse - dense))) > 1e-2  # the sparse path really drops blocks


def infllm_model(pattern="[infllm, attention]", **extra):
    over = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "model.mlp_dim": 64,
            "model.mixer_pattern": pattern, "model.infllm.block_size": 4, "model.infllm.kernel_size": 4,
            "model.infllm.kernel_stride": 2, "model.infllm.local_blocks": 1, "model.infllm.topk": 2,
            "model.infllm.dense_len": 10, "model.infllm.impl": "xla", **extra}
    return load_config(None, [f"{k}={v}" for k, v in over.items()]).model


def test_decoding_from_the_cache_equals_the_full_forward():
    # 30 tokens with dense_len 10: the first queries dense, the later ones sparse (prefill 9 is the dense path)
    full, stepped, _ = full_and_stepped_logits(infllm_model("[infllm]"), prompt=9, seq=30)
    np.testing.assert_allclose(stepped, full, atol=2e-5, rtol=2e-5)


def test_short_sequences_give_the_attention_models_logits():
    import flax.linen as nn

    from jaxeff.models.lm import build_model

    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 259)
    logits = {}
    for pattern in ("[infllm]", "[attention]"):
        model = build_model(infllm_model(pattern, **{"model.infllm.dense_len": 13}), 259, platform="cpu")
        params = nn.meta.unbox(model.init(jax.random.key(1), tokens))["params"]
        logits[pattern] = model.apply({"params": params}, tokens)[0]
    np.testing.assert_allclose(logits["[infllm]"], logits["[attention]"], atol=1e-6)


def test_config_errors_name_the_key_and_the_fix():
    cfg = load_config(None, ["model.mixer_pattern=[infllm]", "model.infllm.impl=pallas", "model.infllm.block_size=12"])
    with pytest.raises(ConfigError, match=r"model.infllm.impl=pallas needs a block_size that is a power of two"):
        check_consistency(cfg)
    cfg = load_config(None, ["model.mixer_pattern=[infllm]", "model.infllm.kernel_stride=64"])
    with pytest.raises(ConfigError, match=r"model.infllm.kernel_stride=64 is larger than model.infllm.kernel_size"):
        check_consistency(cfg)
    check_consistency(load_config(None, ["model.infllm.kernel_stride=64"]))  # unused section: not checked


def test_an_infllm_lm_trains(tmp_path):
    from jaxeff.train import train

    cfg = tiny_config(**{"model.mixer_pattern": "[infllm]", "model.infllm.block_size": 8,
                         "model.infllm.kernel_size": 8, "model.infllm.kernel_stride": 4,
                         "model.infllm.local_blocks": 1, "model.infllm.topk": 2, "model.infllm.dense_len": 0,
                         "train.steps": 20, "train.eval_every": 10, "train.warmup_steps": 4})
    result = train(cfg, tmp_path)
    assert np.mean([result.losses[s] for s in range(16, 21)]) < result.losses[1] - 0.5
