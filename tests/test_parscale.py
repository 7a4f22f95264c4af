"""ParScale (model.parscale): a tiny attention model against a NumPy oracle written from the paper's equations,
cached decoding equal to the full forward for every mixer with a learned start, rows independent of each other,
gradients reaching each stream's start, parameter and FLOP accounting against XLA's own count, training on a
sharded mesh equal to one device, and the errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import full_and_stepped_logits, tiny_config
from jaxeff.config import ConfigError, load_config, validate
from jaxeff.models.lm import build_model, flops_per_token
from jaxeff.models.params import count_params
from jaxeff.models.parscale import parscale_params
from jaxeff.train import train

VOCAB = 61
PARSCALE = {"model.parscale.streams": 3, "model.parscale.prefix_tokens": 5}


def parscale_model(mixer: str = "attention", **extra):
    overrides = {"model.mixer_pattern": f"[{mixer}]", "model.lightning.block_size": 4, "model.mlstm.chunk_size": 4,
                 **PARSCALE, **extra}
    return tiny_config(**overrides).model


def init(cfg, tokens_BS, seed=1):
    model = build_model(cfg, VOCAB, platform="cpu")
    return model, nn.meta.unbox(model.init(jax.random.key(seed), tokens_BS))["params"]


# ----------------------------------------------------------------------------- the oracle


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x_SHK, theta):
    """Half-split rotary embedding at positions 0..S-1."""
    s, _, k = x_SHK.shape
    freq = theta ** (-np.arange(k // 2) * 2.0 / k)
    angle = np.arange(s)[:, None, None] * freq
    x1, x2 = x_SHK[..., : k // 2], x_SHK[..., k // 2:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def _silu(x):
    return x / (1 + np.exp(-x))


def oracle_logits(cfg, params, tokens_S):
    """One sequence through P streams, in float64, from the equations: stream p's attention reads its own prefix
    keys and values (no rotary embedding) before the causal real tokens (positions from 0); after the final norm
    w = softmax(MLP([h_1 .. h_P] interleaved per feature)), w (1 - s) + s / P, and sum_p w_p h_p; tied head."""
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    n_streams, eps, s = cfg.parscale.streams, cfg.norm_eps, len(tokens_S)
    table_VD = p64["embed"]["embedding"]
    finals = []
    for p in range(n_streams):
        x_SD = table_VD[tokens_S]
        for i in range(cfg.n_layers):
            layer = p64[f"layer_{i}"]
            att = layer["mixer"]
            h_SD = _rms(x_SD, layer["mixer_norm"]["scale"], eps)
            q_SHK = _rope(np.einsum("sd,dhk->shk", h_SD, att["q"]["kernel"]), cfg.rope_theta)
            k_SGK = _rope(np.einsum("sd,dgk->sgk", h_SD, att["k"]["kernel"]), cfg.rope_theta)
            v_SGK = np.einsum("sd,dgk->sgk", h_SD, att["v"]["kernel"])
            prefix = layer["stream_start"]
            k_TGK = np.concatenate([prefix["prefix_k"][p].transpose(1, 0, 2), k_SGK])  # prefix first, unrotated
            v_TGK = np.concatenate([prefix["prefix_v"][p].transpose(1, 0, 2), v_SGK])
            n_prefix, group = prefix["prefix_k"].shape[2], q_SHK.shape[1] // k_SGK.shape[1]
            k_THK, v_THK = np.repeat(k_TGK, group, axis=1), np.repeat(v_TGK, group, axis=1)
            scores_HST = np.einsum("shk,thk->hst", q_SHK, k_THK) / np.sqrt(q_SHK.shape[-1])
            visible_ST = np.arange(n_prefix + s)[None, :] <= n_prefix + np.arange(s)[:, None]
            scores_HST = np.where(visible_ST, scores_HST, -np.inf)
            probs_HST = np.exp(scores_HST - scores_HST.max(-1, keepdims=True))
            probs_HST /= probs_HST.sum(-1, keepdims=True)
            out_SHK = np.einsum("hst,thk->shk", probs_HST, v_THK)
            x_SD = x_SD + np.einsum("shk,hkd->sd", out_SHK, att["o"]["kernel"])
            mlp = layer["channel"]
            h_SD = _rms(x_SD, layer["channel_norm"]["scale"], eps)
            x_SD = x_SD + (_silu(h_SD @ mlp["gate"]["kernel"]) * (h_SD @ mlp["up"]["kernel"])) @ mlp["down"]["kernel"]
        finals.append(_rms(x_SD, p64["final_norm"]["scale"], eps))
    h_SDP = np.stack(finals, axis=-1)
    agg = p64["parscale_aggregate"]
    hidden_SD = _silu(h_SDP.reshape(s, -1) @ agg["hidden"]["kernel"] + agg["hidden"]["bias"])
    logits_SP = hidden_SD @ agg["weights"]["kernel"] + agg["weights"]["bias"]
    w_SP = np.exp(logits_SP - logits_SP.max(-1, keepdims=True))
    w_SP /= w_SP.sum(-1, keepdims=True)
    smooth = cfg.parscale.attn_smooth
    w_SP = w_SP * (1 - smooth) + smooth / n_streams
    return np.einsum("sdp,sp->sd", h_SDP, w_SP) @ table_VD.T


def randomized(params, key):
    """Every parameter random and of order one (norm scales near 1): zero biases or tiny inits hide mistakes."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = [jax.random.normal(k, x.shape) * 0.3 for k, x in zip(keys, leaves)]
    tree = jax.tree.unflatten(treedef, out)
    for name in ("final_norm",):
        tree[name]["scale"] = 1 + tree[name]["scale"]
    return tree


def test_attention_streams_equal_the_oracle():
    cfg = parscale_model(**{"model.parscale.attn_smooth": 0.2})  # not the default: the oracle would see it ignored
    tokens_BS = jax.random.randint(jax.random.key(0), (2, 11), 0, VOCAB)
    model, params = init(cfg, tokens_BS)
    params = randomized(params, jax.random.key(2))
    logits_BSV, _, _ = jax.jit(model.apply)({"params": params}, tokens_BS)
    for b in range(2):
        want = oracle_logits(cfg, params, np.asarray(tokens_BS[b]))
        np.testing.assert_allclose(np.asarray(logits_BSV[b, :, :VOCAB]), want[:, :VOCAB], rtol=2e-4, atol=2e-4)


def test_the_oracle_sees_a_wrong_stream_order():
    """Swapping two streams' prefixes changes the output (the oracle test would catch a layout mix-up)."""
    cfg = parscale_model()
    tokens_BS = jax.random.randint(jax.random.key(0), (1, 7), 0, VOCAB)
    model, params = init(cfg, tokens_BS)
    params = randomized(params, jax.random.key(3))
    swapped = jax.tree.map(lambda x: x, params)
    start = swapped["layer_0"]["stream_start"]
    start["prefix_k"] = start["prefix_k"][jnp.array([1, 0, 2])]
    a = model.apply({"params": params}, tokens_BS)[0]
    b = model.apply({"params": swapped}, tokens_BS)[0]
    assert float(jnp.abs(a - b).max()) > 1e-3


# ----------------------------------------------------------------------------- every mixer with a learned start


@pytest.mark.parametrize("mixer", ["attention", "lightning", "mlstm", "companion"])
def test_cached_decoding_from_the_learned_starts_equals_the_full_forward(mixer):
    cfg = parscale_model(mixer, **({"model.companion.state_dim": 4} if mixer == "companion" else {}))
    full, stepped, caches = full_and_stepped_logits(cfg, prompt=5, seq=9, batch=2)
    np.testing.assert_allclose(stepped, full, rtol=1e-4, atol=1e-4)
    rows = {x.shape[0] for x in jax.tree.leaves(caches[0]) if x.ndim}
    assert rows == {2 * cfg.parscale.streams}  # one cache row per example and stream


@pytest.mark.parametrize("mixer", ["attention", "lightning"])  # a prefix and a state; decoding covers the others
def test_rows_are_independent_and_every_stream_start_gets_its_own_gradient(mixer):
    cfg = parscale_model(mixer, **({"model.companion.state_dim": 4} if mixer == "companion" else {}))
    tokens_BS = jax.random.randint(jax.random.key(0), (3, 8), 0, VOCAB)
    model, params = init(cfg, tokens_BS)
    params = randomized(params, jax.random.key(4))
    apply = jax.jit(model.apply)
    together = apply({"params": params}, tokens_BS)[0]
    alone = apply({"params": params}, tokens_BS[1:2])[0]
    np.testing.assert_allclose(together[1:2], alone, rtol=1e-5, atol=1e-5)

    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens_BS)[0] ** 2))(params)
    for name, g_P in grads["layer_0"]["stream_start"].items():
        per_stream = [float(jnp.abs(g_P[p]).sum()) for p in range(cfg.parscale.streams)]
        assert min(per_stream) > 0, name
        assert not np.allclose(g_P[0], g_P[1]), name  # streams are told apart by the aggregation


# ----------------------------------------------------------------------------- accounting


def test_parameter_count_and_flops_against_xla():
    """The added parameters are what the model builds; the FLOP count's ratio P = 3 : P = 1 is XLA's within 10%."""
    tokens_BS = jnp.zeros((2, 32), jnp.int32)
    one = parscale_model(**{"model.parscale.streams": 1})
    three = parscale_model(**{"model.parscale.prefix_tokens": 16})
    counts, xla_flops = {}, {}
    for name, cfg in (("one", one), ("three", three)):
        model, params = init(cfg, tokens_BS)
        counts[name] = count_params(params)
        compiled = jax.jit(lambda p, t, m=model: m.apply({"params": p}, t)[0]).lower(params, tokens_BS).compile()
        analysis = compiled.cost_analysis()
        xla_flops[name] = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    assert counts["three"] - counts["one"] == parscale_params(three)
    ours = flops_per_token(three, VOCAB, 32) / flops_per_token(one, VOCAB, 32)
    assert ours == pytest.approx(xla_flops["three"] / xla_flops["one"], rel=0.1)


# ----------------------------------------------------------------------------- training


def test_training_on_a_sharded_mesh_equals_one_device(tmp_path):
    """Streams ride in the batch rows: data x tensor on 8 devices gives the losses of one device, and they fall."""
    base = {"model.mixer_pattern": "[attention, lightning]", "model.lightning.block_size": 8, **PARSCALE,
            "train.steps": 6, "train.eval_every": 6}
    one = train(tiny_config(**base, **{"mesh.data": 1}), tmp_path / "one", console=False)
    eight = train(tiny_config(**base, **{"mesh.data": 4, "mesh.tensor": 2}), tmp_path / "eight", console=False)
    steps = sorted(one.losses)
    np.testing.assert_allclose([eight.losses[s] for s in steps], [one.losses[s] for s in steps], rtol=2e-4)
    assert one.losses[steps[-1]] < one.losses[steps[0]] - 0.1


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("extra, message", [
    ({"model.mixer_pattern": "[attention, s2]"}, r"the s2 mixer has no learned per-stream start.*streams=1"),
    ({"mesh.sequence": 2, "mesh.data": 1}, r"mesh.sequence=2.*set mesh.sequence=1"),
    ({"model.parscale.attn_smooth": 1.0}, r"attn_smooth"),
])
def test_bad_settings_are_named(extra, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, [f"{k}={v}" for k, v in {**PARSCALE, **extra}.items()]), 2)


def test_forecasting_refuses_streams():
    with pytest.raises(ConfigError, match=r"parallel streams are for language models"):
        validate(load_config(None, ["task=forecast", "model.architecture=spacetime", "model.parscale.streams=2"]), 1)


def test_second_stage_adds_streams_to_a_model_trained_with_one(tmp_path):
    """ParScale's two-stage recipe: train.init_from a one-stream run; the backbone carries over (the first loss is
    the first stage's, not a fresh model's), the stream starts and aggregation start fresh."""
    stage = {"train.steps": 1, "train.warmup_steps": 0, "train.eval_every": 1}  # losses[1]: the initial model's
    first = train(tiny_config(**{"train.steps": 12, "train.learning_rate": 0.01}), tmp_path / "first", console=False)
    second = train(tiny_config(**PARSCALE, **stage, **{"train.init_from": str(tmp_path / "first")}),
                   tmp_path / "second", console=False)
    fresh = train(tiny_config(**PARSCALE, **stage), tmp_path / "fresh", console=False)
    assert abs(second.losses[1] - first.losses[12]) < 0.3 and second.losses[1] < fresh.losses[1] - 1.0
    np.testing.assert_array_equal(np.asarray(second.params["layer_0"]["mixer"]["q"]["kernel"]).shape,
                                  np.asarray(first.params["layer_0"]["mixer"]["q"]["kernel"]).shape)
    assert second.params["layer_0"]["stream_start"]["prefix_k"].shape[0] == PARSCALE["model.parscale.streams"]


@pytest.mark.parametrize("target", ["h100x8", "v5e:2x2"])
def test_the_train_step_compiles_for_an_h100_node_and_a_tpu_slice(target):
    """Hardware truth without the hardware: `jaxeff plan` compiles the ParScale step (prefix attention, a lightning
    and an mLSTM state; their Pallas kernels run per shard from the learned start too) for the target."""
    from jaxeff.train.plan import make_plan

    overrides = ["model.mixer_pattern=[attention, lightning, mlstm]", "model.parscale.streams=4",
                 "model.parscale.prefix_tokens=16", "data.seq_len=256", "train.global_batch_size=16", "mesh.data=-1"]
    plan = make_plan(load_config("configs/debug.yaml", overrides), target)
    assert plan.fits and plan.devices == (8 if target == "h100x8" else 4)
