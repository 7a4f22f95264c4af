"""InfLLM v2's block selection against a NumPy model of what MiniCPM4's released code keeps, at small shapes scaled
down from MiniCPM4's `sparse_config` (block 64 -> 16, kernel 32 -> 8, stride 16 -> 4, window 2048 = 32 blocks ->
2-4 blocks, topk 64 -> 4-6), and the config mapping. docs/models/infllm.md, "Checked against the released code",
says what was read; in short:

* pooled keys: the mean of each whole window of `kernel_size` keys, windows every `kernel_stride` tokens;
* stage 1: per query head, a softmax over the pooled keys whose window ends at or before the query
  (t >= c * stride + kernel_size - 1), zeros elsewhere, summed over the heads of the KV group;
* block score: a max pool over pooled keys with window block/stride + 1, stride block/stride and padding 1,
  clipped to the pooled keys that exist; this is the "overlap" rule when kernel_size = 2 * kernel_stride, as
  MiniCPM4's settings (and every case here) have;
* forced blocks, top-k, and what the attention then reads differ between the two releases modelled below;
* below `dense_len` (a whole-call switch on the sequence length) the layer is dense.

The model here is loops over (batch, KV head, query), written for this test; the stage-1 softmax is exact (the
torch references' rule), not the CUDA kernel's coarse-LSE approximation, which jaxeff does not implement.
"""

import jax
import numpy as np
import pytest

from jaxeff.config import load_config
from jaxeff.config.mixers import InfllmConfig
from pallas_kernels.infllm import selection

# MiniCPM4's `sparse_config` (config.json); the modeling code falls back to the same numbers
MINICPM4_SPARSE_CONFIG = dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=2048,
                              topk=64, use_nope=False, dense_len=8192)

# "2025-09": modeling_minicpm.py as published with MiniCPM4.1 (topk + window/block blocks handed to the kernel) over
#            infllmv2_cuda_impl after its 2025-08-25 change: the max pool gives +inf to the init blocks and to the
#            blocks 0 <= i - j <= window/block (one more than the window), the top-k runs over every block, blocks
#            past the query's are dropped, and the attention reads exactly the chosen blocks (no separate window).
# "2025-06": the first release (sglang's MiniCPM4 model of that time, infllmv2 pooling before 2025-08-25): +inf for
#            the init blocks, -inf for 0 <= i - j < window/block, top-`topk` over every block, blocks at or past
#            the query's dropped, and the attention adds a sliding window of window/block blocks.
RELEASES = ("2025-09", "2025-06")
# Ties: adjacent blocks share a pooled key, so equal block scores are common (the shared key is often the max).
# MiniCPM4's torch.topk leaves their order unspecified; the model here, like jaxeff, takes the lower block index.
# Scores that differ by less than NEAR but are not equal (float32 in jaxeff, float64 here) make a query "unsure".
NEAR = 1e-5


def jaxeff_settings(sparse_config, release):
    """model.infllm settings that keep the same blocks as MiniCPM4's code with this `sparse_config`."""
    sc = sparse_config
    window = sc["window_size"] // sc["block_size"]
    if release == "2025-09":  # forced: init + (window + 1) blocks; scored: topk + window - init - (window + 1)
        local, topk = window + 1, sc["topk"] - 1
    else:  # forced: init (within topk) + the window on top
        local, topk = window, sc["topk"]
    return dict(kernel_size=sc["kernel_size"], kernel_stride=sc["kernel_stride"], block_size=sc["block_size"],
                init_blocks=sc["init_blocks"], local_blocks=local, topk=topk, dense_len=sc["dense_len"])


def _stage1_scores(q_rd, pooled_cd, t, kernel_size, kernel_stride):
    """Score of every pooled key for the query at t: per-head softmax over the visible ones, summed over heads."""
    n = pooled_cd.shape[0]
    score = np.zeros(n)
    seen = [c for c in range(n) if c * kernel_stride + kernel_size - 1 <= t]
    if not seen:
        return score
    for q_d in q_rd:
        logits = pooled_cd[seen] @ q_d / np.sqrt(q_d.shape[0])
        p = np.exp(logits - logits.max())
        score[seen] += p / p.sum()
    return score


def _max_pool(score_c, n_blocks, block_size, kernel_stride):
    """MiniCPM4's pooling: window block/stride + 1, stride block/stride, padding 1; -inf where the window is empty."""
    step = block_size // kernel_stride
    out = np.full(n_blocks, -np.inf)
    for j in range(n_blocks):
        lo, hi = max(j * step - 1, 0), min(j * step - 1 + step + 1, len(score_c))
        if hi > lo:
            out[j] = score_c[lo:hi].max()
    return out


def _top_k(x, k):
    """(chosen, unsure): the k largest of x, equal values in index order; unsure if a value other than the k-th
    best but within NEAR of it could swap in or out."""
    order = np.lexsort((np.arange(len(x)), -x))
    chosen = np.zeros(len(x), bool)
    chosen[order[:k]] = True
    v = x[order[k - 1]]
    if not np.isfinite(v) or k == len(x):
        return chosen, False
    return chosen, bool(((np.abs(x - v) <= NEAR) & (x != v)).any())


def minicpm4_selection(q, k, sparse_config, release):
    """bool [B, G, S, J] (blocks kept per batch, KV head, query) and bool [B, G, S] (unsure: a near-tie at the
    top-k boundary) from q [B, S, H, D], k [B, S, G, D]."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    sc = sparse_config
    w, s, bs, init = sc["kernel_size"], sc["kernel_stride"], sc["block_size"], sc["init_blocks"]
    window = sc["window_size"] // bs
    b, seq, h, _ = q.shape
    g = k.shape[2]
    r = h // g
    n_blocks = -(-seq // bs)
    kept = np.zeros((b, g, seq, n_blocks), bool)
    unsure = np.zeros((b, g, seq), bool)
    j = np.arange(n_blocks)
    for bi in range(b):
        for gi in range(g):
            n_pooled = 0 if seq < w else (seq - w) // s + 1
            pooled = np.stack([k[bi, c * s:c * s + w, gi].mean(0) for c in range(n_pooled)] or [np.zeros(1)])
            for t in range(seq):
                i = t // bs
                if seq < sc["dense_len"]:  # the whole call is dense
                    kept[bi, gi, t] = j <= i
                    continue
                score = _stage1_scores(q[bi, t, gi * r:(gi + 1) * r], pooled[:n_pooled], t, w, s)
                blocks = _max_pool(score, n_blocks, bs, s)
                if release == "2025-09":
                    blocks[(j < init) | ((i - j >= 0) & (i - j <= window))] = np.inf
                    chosen, unsure[bi, gi, t] = _top_k(blocks, min(sc["topk"] + window, n_blocks))
                    kept[bi, gi, t] = chosen & (j <= i)
                else:
                    blocks[(j >= init) & (i - j >= 0) & (i - j < window)] = -np.inf
                    blocks[j < init] = np.inf
                    chosen, unsure[bi, gi, t] = _top_k(blocks, min(sc["topk"], n_blocks))
                    kept[bi, gi, t] = (chosen & (j < i)) | ((i - j >= 0) & (i - j < window))
    return kept, unsure


def _qk(b, s, h, g, d, seed):
    kq, kk = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kq, (b, s, h, d)), jax.random.normal(kk, (b, s, g, d))


# small shapes with MiniCPM4's ratios: block = 4 strides, kernel = 2 strides; lengths not multiples of the block
CASES = [
    dict(seq=203, heads=4, kv=2, sc=dict(init_blocks=1, window_size=48, topk=5)),
    dict(seq=150, heads=8, kv=2, sc=dict(init_blocks=1, window_size=32, topk=4)),
    dict(seq=229, heads=4, kv=2, sc=dict(init_blocks=2, window_size=64, topk=4)),
]


def _small(sc):
    return {**MINICPM4_SPARSE_CONFIG, "kernel_size": 8, "kernel_stride": 4, "block_size": 16, "dense_len": 0, **sc}


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"S{c['seq']}")
def test_selection_keeps_the_blocks_minicpm4s_code_keeps(case, release):
    sc = _small(case["sc"])
    q, k = _qk(2, case["seq"], case["heads"], case["kv"], 16, seed=case["seq"])
    want, unsure = minicpm4_selection(q, k, sc, release)
    got = np.asarray(selection(q, k, **jaxeff_settings(sc, release)))
    bad = np.argwhere((got != want).any(-1) & ~unsure)
    assert not len(bad), f"{len(bad)} queries differ, first (batch, kv head, query) = {bad[0].tolist()}"
    assert unsure.mean() < 0.02
    # not vacuous: many queries drop causal blocks that are not forced
    causal = np.arange(got.shape[-1])[None, :] <= np.arange(case["seq"])[:, None] // sc["block_size"]
    assert (got.sum(-1) < causal.sum(-1)).mean() > 0.25


@pytest.mark.parametrize("release", RELEASES)
def test_dense_len_switches_the_whole_call_in_minicpm4_and_each_query_in_jaxeff(release):
    sc = _small(dict(init_blocks=1, window_size=48, topk=5, dense_len=170))
    settings = jaxeff_settings(sc, release)
    for seq in (203, 90):
        q, k = _qk(2, seq, 4, 2, 16, seed=seq + 1)
        want, unsure = minicpm4_selection(q, k, sc, release)
        got = np.asarray(selection(q, k, **settings))
        same = ~(got != want).any(-1) | unsure
        late = np.arange(seq) + 1 >= sc["dense_len"]  # contexts of at least dense_len tokens: both sparse
        assert same[..., late].all()
        # earlier queries: jaxeff reads every causal block (documented departure); MiniCPM4 is dense only when
        # the whole sequence is shorter than dense_len, and then the two agree everywhere
        causal = np.arange(got.shape[-1])[None, :] <= np.arange(seq)[:, None] // sc["block_size"]
        assert (got[..., ~late, :] == causal[~late]).all()
        if seq < sc["dense_len"]:
            assert same.all()
        else:
            assert (got[..., late, :] != causal[late]).any()  # the late queries are really sparse
            assert (want[..., ~late, :] != causal[~late]).any()  # and MiniCPM4's early ones too


def test_minicpm4_sparse_config_maps_onto_the_default_config():
    defaults = InfllmConfig()
    current = jaxeff_settings(MINICPM4_SPARSE_CONFIG, "2025-09")
    # window_size 2048 -> the query's block and the 32 before it; 96 blocks per late query: 1 + 33 forced, 62 scored
    assert current == dict(kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1, local_blocks=33, topk=63,
                           dense_len=8192)
    assert {key: getattr(defaults, key) for key in current} == current
    assert load_config(None, []).model.infllm == defaults  # model.infllm starts from these defaults
    first = jaxeff_settings(MINICPM4_SPARSE_CONFIG, "2025-06")  # the first release: 32 local on top of topk 64
    assert (first["local_blocks"], first["topk"]) == (32, 64)
    assert current["topk"] + current["local_blocks"] == first["topk"] + first["local_blocks"] == 96


def test_the_first_releases_mapping_differs_from_the_current_code_by_one_block():
    """With local = window/block and topk as configured (the first release's mapping, jaxeff's defaults before this
    comparison), a late query keeps as many blocks as the current MiniCPM4 code, and at most one differs: jaxeff may
    drop block i - window/block (forced there) and keep its next-best scored block instead."""
    sc = _small(dict(init_blocks=1, window_size=48, topk=5))
    window = sc["window_size"] // sc["block_size"]
    q, k = _qk(2, 203, 4, 2, 16, seed=7)
    want, unsure = minicpm4_selection(q, k, sc, "2025-09")
    got = np.asarray(selection(q, k, **jaxeff_settings(sc, "2025-06")))
    i = np.arange(203) // sc["block_size"]
    late = i >= sc["init_blocks"] + window  # block i - window is neither an init block nor before them
    missing, extra = want & ~got, got & ~want
    sure = ~unsure
    assert (got.sum(-1) == want.sum(-1))[sure].all()
    assert (missing.sum(-1) <= 1)[sure].all() and (extra.sum(-1) <= 1)[sure].all()
    assert not (missing & (np.arange(got.shape[-1]) != (i - window)[:, None]))[sure].any()
    assert missing[..., late, :].any()  # the difference is real at these shapes
    assert not (missing | extra)[..., ~late, :][sure[..., ~late]].any()
