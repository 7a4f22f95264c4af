"""`jaxeff import` of Qwen2 and of ParScale's Qwen2 layout (model_type "qwen2_parscale").

P = 1: a tiny random Qwen2 built and saved by transformers itself; our logits (full forward and cached step
decoding) equal transformers'. P > 1: a tiny checkpoint written here in the released ParScale layout (per-layer
prefix_k / prefix_v [P, G, T, K], aggregate_layer.0 / .2); our logits equal an independent NumPy forward of ParScale
written here from its equations (checked against transformers' Qwen2 on the P = 1 model), not through jaxeff."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from helpers import assert_user_error, float32_model_of_export, run_jaxeff
from jaxeff.errors import UserError
from jaxeff.infer import load_inference_model
from jaxeff.infer.hf_import import import_checkpoint
from jaxeff.models.decoding import decode_caches

VOCAB, D, H, G, K, M, LAYERS = 300, 64, 4, 2, 16, 96, 2
P, T, SMOOTH = 3, 5, 0.05  # ParScale: streams, prefix tokens per stream and layer, weight smoothing
THETA = 500.0  # a small RoPE base: every rotated pair turns noticeably over the 24 positions
TOKENS_BS = np.stack([(np.arange(24) * 7 + 3) % VOCAB, (np.arange(24) * 13 + 100) % VOCAB])
PROMPT = 11


def _qwen2_config(**changes):
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": VOCAB, "hidden_size": D,
              "intermediate_size": M, "num_hidden_layers": LAYERS, "num_attention_heads": H,
              "num_key_value_heads": G, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": THETA,
              "rope_scaling": None, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
              "tie_word_embeddings": True, "max_position_embeddings": 128}
    config.update(changes)
    return config


def _parscale_config(**changes):
    return _qwen2_config(model_type="qwen2_parscale", architectures=["Qwen2ParScaleForCausalLM"], parscale_n=P,
                         parscale_n_tokens=T, parscale_attn_smooth=SMOOTH, **changes)


def _parscale_weights(seed=0):
    """Every tensor of a tiny tied ParScale model in the released names and shapes, random and non-trivial."""
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def scale(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": normal((VOCAB, D), 1.0), "model.norm.weight": scale(D),
         "model.aggregate_layer.0.weight": normal((D, P * D), (P * D) ** -0.5),
         "model.aggregate_layer.0.bias": normal((D,), 0.3),
         "model.aggregate_layer.2.weight": normal((P, D), 2 * D ** -0.5),
         "model.aggregate_layer.2.bias": normal((P,), 0.5)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"] = scale(D), scale(D)
        for name, rows in (("q", H * K), ("k", G * K), ("v", G * K)):
            w[p + f"self_attn.{name}_proj.weight"] = normal((rows, D), D ** -0.5)
            w[p + f"self_attn.{name}_proj.bias"] = normal((rows,), 0.5)
        w[p + "self_attn.o_proj.weight"] = normal((D, H * K), (H * K) ** -0.5)
        w[p + "self_attn.prefix_k"] = normal((P, G, T, K), 1.0)
        w[p + "self_attn.prefix_v"] = normal((P, G, T, K), 1.0)
        w[p + "mlp.gate_proj.weight"] = normal((M, D), D ** -0.5)
        w[p + "mlp.up_proj.weight"] = normal((M, D), D ** -0.5)
        w[p + "mlp.down_proj.weight"] = normal((D, M), M ** -0.5)
    return w


# ----------------------------------------------------------------------------- the oracle


def _rms(x, weight, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope(x_SHK, positions_S):
    """Rotary embedding: pairs (i, i + K/2), angle position * THETA^(-2i/K) (Qwen2's rotate_half)."""
    k = x_SHK.shape[-1]
    angle_SF = positions_S[:, None] * THETA ** (-np.arange(0, k, 2) / k)[None, :]
    cos, sin = np.cos(angle_SF)[:, None, :], np.sin(angle_SF)[:, None, :]
    a, b = x_SHK[..., :k // 2], x_SHK[..., k // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def parscale_logits(w, tokens_S, streams, smooth=SMOOTH, rope_prefix=False, stream_major=False, tied=True):
    """ParScale's forward of one sequence in float64, from its equations: `streams` copies of the input; stream p's
    attention in every layer also sees T learned keys/values (prefix_k[p], prefix_v[p], no RoPE) before the real
    tokens, which keep RoPE positions 0.. S-1; after the final norm an MLP over the streams' features interleaved
    (d P + p) gives softmax weights, smoothed, that sum the streams; then the head. streams = 1 is plain Qwen2.
    `rope_prefix`, `stream_major`: the mistakes the comparison must catch."""
    w = {name: value.astype(np.float64) for name, value in w.items()}
    s = len(tokens_S)
    positions_S = np.arange(s, dtype=np.float64)
    x_PSD = np.repeat(w["model.embed_tokens.weight"][tokens_S][None], streams, axis=0)
    for i in range(LAYERS):
        p = f"model.layers.{i}.self_attn."
        y_PSD = _rms(x_PSD, w[f"model.layers.{i}.input_layernorm.weight"])

        def project(name, heads):
            return (y_PSD @ w[f"{p}{name}_proj.weight"].T + w[f"{p}{name}_proj.bias"]).reshape(streams, s, heads, K)

        q_PSHK, k_PSGK, v_PSGK = project("q", H), project("k", G), project("v", G)
        q_PSHK = np.stack([_rope(q, positions_S) for q in q_PSHK])
        k_PSGK = np.stack([_rope(k, positions_S) for k in k_PSGK])
        mask_SX = np.tril(np.ones((s, s), bool))
        if streams > 1:  # the prefix: every real token sees all T of its stream's learned keys and values
            pk_PTGK = w[p + "prefix_k"].transpose(0, 2, 1, 3)
            pv_PTGK = w[p + "prefix_v"].transpose(0, 2, 1, 3)
            if rope_prefix:
                pk_PTGK = np.stack([_rope(k, np.arange(T, dtype=np.float64)) for k in pk_PTGK])
            k_PSGK = np.concatenate([pk_PTGK, k_PSGK], axis=1)
            v_PSGK = np.concatenate([pv_PTGK, v_PSGK], axis=1)
            mask_SX = np.concatenate([np.ones((s, T), bool), mask_SX], axis=1)
        k_PXHK, v_PXHK = np.repeat(k_PSGK, H // G, axis=2), np.repeat(v_PSGK, H // G, axis=2)  # head h reads h // 2
        scores_PHSX = np.einsum("pshk,pxhk->phsx", q_PSHK, k_PXHK) / np.sqrt(K)
        probs_PHSX = _softmax(np.where(mask_SX, scores_PHSX, -np.inf))
        attn_PSD = np.einsum("phsx,pxhk->pshk", probs_PHSX, v_PXHK).reshape(streams, s, H * K)
        x_PSD = x_PSD + attn_PSD @ w[p + "o_proj.weight"].T
        y_PSD = _rms(x_PSD, w[f"model.layers.{i}.post_attention_layernorm.weight"])
        gate_PSM = y_PSD @ w[f"model.layers.{i}.mlp.gate_proj.weight"].T
        up_PSM = y_PSD @ w[f"model.layers.{i}.mlp.up_proj.weight"].T
        x_PSD = x_PSD + (gate_PSM / (1 + np.exp(-gate_PSM)) * up_PSM) @ w[f"model.layers.{i}.mlp.down_proj.weight"].T
    x_PSD = _rms(x_PSD, w["model.norm.weight"])
    if streams > 1:
        order = (1, 0, 2) if stream_major else (1, 2, 0)  # features [S, P D] (p D + d) or [S, D P] (d P + p)
        features_SX = x_PSD.transpose(order).reshape(s, streams * D)
        hidden_SD = features_SX @ w["model.aggregate_layer.0.weight"].T + w["model.aggregate_layer.0.bias"]
        hidden_SD = hidden_SD / (1 + np.exp(-hidden_SD))
        weights_SP = _softmax(hidden_SD @ w["model.aggregate_layer.2.weight"].T + w["model.aggregate_layer.2.bias"])
        weights_SP = weights_SP * (1 - smooth) + smooth / streams
        out_SD = np.einsum("psd,sp->sd", x_PSD, weights_SP)
    else:
        out_SD = x_PSD[0]
    return out_SD @ w["model.embed_tokens.weight" if tied else "lm_head.weight"].T


# ----------------------------------------------------------------------------- helpers and fixtures


def _forward_and_stepped(export_dir):
    """Our float32 logits [B, S, VOCAB]: the full forward, and a prefill of PROMPT tokens then one token a step from
    decode_caches (positions PROMPT-1 .. S-1)."""
    model, params, cfg = float32_model_of_export(export_dir)
    apply = jax.jit(model.apply)
    tokens_BS = jnp.asarray(TOKENS_BS)
    b, s = TOKENS_BS.shape
    full_BSV = np.asarray(apply({"params": params}, tokens_BS)[0][..., :VOCAB])
    caches = decode_caches(model, params, b, s)
    prompt_BS = jnp.broadcast_to(jnp.arange(PROMPT), (b, PROMPT))
    logits, caches, _ = apply({"params": params}, tokens_BS[:, :PROMPT], prompt_BS, caches)
    stepped = [logits[:, -1]]
    for t in range(PROMPT, s):
        logits, caches, _ = apply({"params": params}, tokens_BS[:, t:t + 1], jnp.full((b, 1), t), caches)
        stepped.append(logits[:, -1])
    return full_BSV, np.asarray(jnp.stack(stepped, axis=1)[..., :VOCAB]), cfg


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module", params=["tied", "untied"])
def hf_qwen2(request, tmp_path_factory):
    """A tiny random Qwen2 saved by transformers (safetensors), and its export."""
    torch.manual_seed(0 if request.param == "tied" else 1)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=M, num_hidden_layers=LAYERS,
                         num_attention_heads=H, num_key_value_heads=G, rope_theta=THETA,
                         tie_word_embeddings=request.param == "tied", attn_implementation="eager")
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():  # every weight and bias random (the default init: zero biases, unit norms)
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if "norm" in name else 0.5 if "bias" in name or "embed" in name
                                           else p.shape[-1] ** -0.5) + (1.0 if "norm" in name else 0.0))
    src = tmp_path_factory.mktemp("hf") / f"qwen2-{request.param}"
    model.save_pretrained(src)
    out, arch, n_params = import_checkpoint(src, tmp_path_factory.mktemp("imp") / "export")
    assert arch == "qwen2"
    padding = (384 - VOCAB) * D * (1 if config.tie_word_embeddings else 2)
    assert n_params == sum(p.numel() for p in model.parameters()) + padding
    return model, out


@pytest.fixture(scope="module")
def parscale_checkpoint(tmp_path_factory):
    src = tmp_path_factory.mktemp("hf") / "parscale"
    src.mkdir()
    weights = _parscale_weights()
    save_file(weights, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(_parscale_config()))
    out, arch, n_params = import_checkpoint(src, tmp_path_factory.mktemp("imp") / "export")
    assert arch == "qwen2_parscale"
    assert n_params == sum(v.size for v in weights.values()) + (384 - VOCAB) * D
    return weights, src, out


# ----------------------------------------------------------------------------- P = 1: transformers' Qwen2


def test_qwen2_logits_and_cached_decoding_equal_transformers(hf_qwen2):
    model, out = hf_qwen2
    full_BSV, stepped_BSV, cfg = _forward_and_stepped(out)
    assert (cfg.qkv_bias, cfg.rope_theta, cfg.n_kv_heads, cfg.parscale.streams) == (True, THETA, G, 1)
    tokens = torch.tensor(TOKENS_BS)
    with torch.no_grad():
        theirs_BSV = model(tokens).logits.numpy()
        step = model(tokens[:, :PROMPT], cache=DynamicCache(config=model.config), use_cache=True)
        theirs_stepped = [step.logits[:, -1]]
        for t in range(PROMPT, tokens.shape[1]):
            step = model(tokens[:, t:t + 1], cache=step.cache, use_cache=True)
            theirs_stepped.append(step.logits[:, -1])
    theirs_stepped_BSV = torch.stack(theirs_stepped, 1).numpy()
    assert np.abs(theirs_BSV).max() > 3  # logits far from 0: the comparison is not trivially met
    np.testing.assert_allclose(full_BSV, theirs_BSV, atol=1e-4, rtol=0)
    np.testing.assert_allclose(stepped_BSV, theirs_stepped_BSV, atol=1e-4, rtol=0)
    # The oracle of the P > 1 tests, run as plain Qwen2 (P = 1), is transformers' model too.
    weights = {name: p.detach().numpy() for name, p in model.state_dict().items()}
    for b in range(len(TOKENS_BS)):
        oracle_SV = parscale_logits(weights, TOKENS_BS[b], streams=1, tied=model.config.tie_word_embeddings)
        np.testing.assert_allclose(oracle_SV, theirs_BSV[b], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- P > 1: the ParScale equations


def test_parscale_logits_and_cached_decoding_equal_the_equations(parscale_checkpoint):
    weights, _, out = parscale_checkpoint
    full_BSV, stepped_BSV, cfg = _forward_and_stepped(out)
    assert (cfg.parscale.streams, cfg.parscale.prefix_tokens, cfg.parscale.attn_smooth) == (P, T, SMOOTH)
    oracle_BSV = np.stack([parscale_logits(weights, tokens_S, P) for tokens_S in TOKENS_BS])
    assert np.abs(oracle_BSV).max() > 3
    np.testing.assert_allclose(full_BSV, oracle_BSV, atol=1e-4, rtol=0)
    np.testing.assert_allclose(stepped_BSV, oracle_BSV[:, PROMPT - 1:], atol=1e-4, rtol=0)
    # The comparison tells the conventions apart: each of these mistakes, or dropping the streams, moves the
    # logits far beyond its tolerance.
    for wrong in ({"rope_prefix": True}, {"stream_major": True}, {"smooth": 0.0}):
        wrong_SV = parscale_logits(weights, TOKENS_BS[0], P, **wrong)
        assert _max_diff(wrong_SV, full_BSV[0]) > 1e-2, wrong


def test_a_saved_tied_head_is_skipped_as_transformers_does(parscale_checkpoint, tmp_path):
    """With tie_word_embeddings, transformers reads the embedding as the head even when lm_head.weight is saved."""
    weights, src, _ = parscale_checkpoint
    extra = _rewrite(src, tmp_path / "extra", replace={"lm_head.weight": np.ones((VOCAB, D), np.float32)})
    out, _, n_params = import_checkpoint(extra, tmp_path / "out")
    assert n_params == sum(v.size for v in weights.values()) + (384 - VOCAB) * D
    assert "head" not in load_inference_model(out).params


# ----------------------------------------------------------------------------- what is refused


def _rewrite(src, dst, config=None, drop=(), replace=None):
    from safetensors.numpy import load_file

    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    for name in drop:
        del tensors[name]
    tensors.update(replace or {})
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **(config or {})}))
    return dst


@pytest.mark.parametrize("case, message", [
    ("prefix_tokens", "tensor 'model.layers.1.self_attn.prefix_k' has shape (3, 2, 6, 16), which does not fit "
                      "layer_1/stream_start/prefix_k (3, 2, 5, 16)"),
    ("aggregate", "tensor 'model.aggregate_layer.2.bias' is missing (needed for parscale_aggregate/weights/bias)"),
    ("sliding", "Qwen2 with use_sliding_window=true is not supported (layers 1 would attend within "
                "sliding_window=4096 tokens"),
    ("activation", "Qwen2 with hidden_act='gelu' is not supported"),
    ("rope_scaling", "Qwen2 with rope_scaling={'rope_type': 'yarn', 'factor': 4.0} is not supported"),
    ("smooth", "parscale_attn_smooth=1.0 must be a number in [0, 1)"),
])
def test_bad_checkpoints_are_one_line_naming_the_tensor_or_key(parscale_checkpoint, tmp_path, case, message):
    src = parscale_checkpoint[1]
    make = {
        "prefix_tokens": lambda d: _rewrite(src, d, replace={
            "model.layers.1.self_attn.prefix_k": np.zeros((P, G, T + 1, K), np.float32)}),
        "aggregate": lambda d: _rewrite(src, d, drop=["model.aggregate_layer.2.bias"]),
        "sliding": lambda d: _rewrite(src, d, config={"use_sliding_window": True, "max_window_layers": 1}),
        "activation": lambda d: _rewrite(src, d, config={"hidden_act": "gelu"}),
        "rope_scaling": lambda d: _rewrite(src, d, config={"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
        "smooth": lambda d: _rewrite(src, d, config={"parscale_attn_smooth": 1.0}),
    }
    bad = make[case](tmp_path / "bad")
    with pytest.raises(UserError) as error:
        import_checkpoint(bad, tmp_path / "out")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_the_command_line_refuses_a_sliding_window(parscale_checkpoint, tmp_path):
    bad = _rewrite(parscale_checkpoint[1], tmp_path / "bad", config={"use_sliding_window": True,
                                                                     "max_window_layers": 0})
    assert_user_error(run_jaxeff("import", "--from", str(bad), "--out", str(tmp_path / "out")),
                      "use_sliding_window=true is not supported (layers 0, 1 would attend")
    assert not (tmp_path / "out").exists()
