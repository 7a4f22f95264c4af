"""`jaxeff import` of Apple's OpenELM Hugging Face layout: tiny checkpoints written in the released layout (fused
qkv_proj, fused proj_1, per-layer head lists) import onto attention + SwiGLU layers with explicit layer scaling, and
their logits (full forward and cached step decoding) equal an independent NumPy forward of OpenELM written here
from its equations, not through jaxeff."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import float32_model_of_export
from jaxeff.errors import UserError
from jaxeff.infer.hf_import import import_checkpoint
from jaxeff.infer.hf_layouts import ARCHITECTURES
from jaxeff.models.lm import init_caches

VOCAB, D, K = 300, 64, 16
TOKENS_S = (np.arange(40) * 7 + 3) % VOCAB
PROMPT = 21

# Per-layer (query heads, KV heads, SwiGLU width), worked out by hand from each config below.
CHECKPOINTS = {
    # The lists as config.json holds them; GQA groups vary per layer (2, 4, 2); rope base 500: fast rotations.
    "tied": ({"num_query_heads": [2, 4, 4], "num_kv_heads": [1, 1, 2], "ffn_multipliers": [0.5, 1.0, 2.0],
              "normalize_qk_projections": True, "share_input_output_layers": True, "rope_freq_constant": 500},
             [(2, 1, 32), (4, 1, 64), (4, 2, 128)]),
    # No lists: derived as OpenELMConfig does. qkv [0.5, 1.0] -> 0.5, 0.75, 1.0 x 64 rounded to multiples of
    # 16 x 2 groups: 32, 64, 64 -> 2, 4, 4 heads; ffn [0.5, 4.0] -> 0.5, 2.25, 4.0 x 64 to multiples of 16.
    # Unshared head (lm_head), plus the classifier the unshared model holds and never reads; no q/k norms.
    "untied": ({"qkv_multipliers": [0.5, 1.0], "num_gqa_groups": 2, "ffn_multipliers": [0.5, 4.0],
                "normalize_qk_projections": False, "share_input_output_layers": False, "tie_word_embeddings": False,
                "rope_freq_constant": 10000},
               [(2, 1, 32), (4, 2, 144), (4, 2, 256)]),
}


def _config(**changes):
    config = {"model_type": "openelm", "architectures": ["OpenELMForCausalLM"], "num_transformer_layers": 3,
              "model_dim": D, "head_dim": K, "ffn_dim_divisor": 16, "ffn_with_glu": True, "vocab_size": VOCAB,
              "activation_fn_name": "swish", "normalization_layer_name": "rms_norm", "max_context_length": 128,
              "rope_max_length": 256, "bos_token_id": 1, "eos_token_id": 2}
    config.update(changes)
    return config


def _random_weights(config, shapes, seed):
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def scale(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w = {"transformer.token_embeddings.weight": normal((VOCAB, D), 0.5), "transformer.norm.weight": scale(D)}
    if not config["share_input_output_layers"]:
        w["lm_head.weight"] = normal((VOCAB, D), 0.5)
        w["transformer.classifier.weight"] = normal((VOCAB, D), 0.5)
    for i, (h, g, f) in enumerate(shapes):
        p = f"transformer.layers.{i}."
        w[p + "attn_norm.weight"], w[p + "ffn_norm.weight"] = scale(D), scale(D)
        w[p + "attn.qkv_proj.weight"] = normal(((h + 2 * g) * K, D), D ** -0.5)
        w[p + "attn.out_proj.weight"] = normal((D, h * K), (h * K) ** -0.5)
        w[p + "ffn.proj_1.weight"] = normal((2 * f, D), D ** -0.5)
        w[p + "ffn.proj_2.weight"] = normal((D, f), f ** -0.5)
        if config["normalize_qk_projections"]:
            w[p + "attn.q_norm.weight"], w[p + "attn.k_norm.weight"] = scale(K), scale(K)
    return w


# ----------------------------------------------------------------------------- the oracle


def _rms(x, weight):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * weight


def _rope(x_SHK, theta, interleaved=False):
    """Rotary embedding at positions 0..S-1: pairs (i, i + K/2) (OpenELM), or (2i, 2i+1) for the mutation check."""
    s, _, k = x_SHK.shape
    angle_SP = np.arange(s)[:, None] * theta ** (-np.arange(0, k, 2) / k)[None, :]
    cos, sin = np.cos(angle_SP)[:, None, :], np.sin(angle_SP)[:, None, :]
    a, b = (x_SHK[..., 0::2], x_SHK[..., 1::2]) if interleaved else (x_SHK[..., :k // 2], x_SHK[..., k // 2:])
    ra, rb = a * cos - b * sin, b * cos + a * sin
    if interleaved:
        return np.stack([ra, rb], axis=-1).reshape(x_SHK.shape)
    return np.concatenate([ra, rb], axis=-1)


def openelm_logits(w, config, shapes, tokens_S, swap_glu=False, swap_kv=False, interleaved_rope=False):
    """OpenELM's forward in float64: pre-norm blocks of causal GQA attention and a SwiGLU, final norm, head."""
    w = {name: value.astype(np.float64) for name, value in w.items()}
    s = len(tokens_S)
    x_SD = w["transformer.token_embeddings.weight"][tokens_S]
    causal_SS = np.tril(np.ones((s, s), bool))
    for i, (h, g, f) in enumerate(shapes):
        p = f"transformer.layers.{i}."
        y_SD = _rms(x_SD, w[p + "attn_norm.weight"])
        qkv_SNK = (y_SD @ w[p + "attn.qkv_proj.weight"].T).reshape(s, h + 2 * g, K)
        q_SHK, k_SGK, v_SGK = qkv_SNK[:, :h], qkv_SNK[:, h:h + g], qkv_SNK[:, h + g:]
        if swap_kv:
            k_SGK, v_SGK = v_SGK, k_SGK
        if config["normalize_qk_projections"]:
            q_SHK, k_SGK = _rms(q_SHK, w[p + "attn.q_norm.weight"]), _rms(k_SGK, w[p + "attn.k_norm.weight"])
        theta = config["rope_freq_constant"]
        q_SHK, k_SGK = _rope(q_SHK, theta, interleaved_rope), _rope(k_SGK, theta, interleaved_rope)
        k_SHK, v_SHK = np.repeat(k_SGK, h // g, axis=1), np.repeat(v_SGK, h // g, axis=1)  # head j reads j // (h/g)
        scores_HSS = np.einsum("shk,thk->hst", q_SHK, k_SHK) / np.sqrt(K)
        scores_HSS = np.where(causal_SS, scores_HSS, -np.inf)
        probs_HSS = np.exp(scores_HSS - scores_HSS.max(-1, keepdims=True))
        probs_HSS /= probs_HSS.sum(-1, keepdims=True)
        attn_SD = np.einsum("hst,thk->shk", probs_HSS, v_SHK).reshape(s, h * K) @ w[p + "attn.out_proj.weight"].T
        x_SD = x_SD + attn_SD
        y_SF2 = _rms(x_SD, w[p + "ffn_norm.weight"]) @ w[p + "ffn.proj_1.weight"].T
        act_SF, lin_SF = (y_SF2[:, f:], y_SF2[:, :f]) if swap_glu else (y_SF2[:, :f], y_SF2[:, f:])
        x_SD = x_SD + (act_SF / (1 + np.exp(-act_SF)) * lin_SF) @ w[p + "ffn.proj_2.weight"].T
    x_SD = _rms(x_SD, w["transformer.norm.weight"])
    head_VD = w["transformer.token_embeddings.weight" if config["share_input_output_layers"] else "lm_head.weight"]
    return x_SD @ head_VD.T


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def imported(request, tmp_path_factory):
    """(config, per-layer shapes, weights, export directory, parameter count) of one tiny OpenELM."""
    changes, shapes = CHECKPOINTS[request.param]
    config = _config(**changes)
    weights = _random_weights(config, shapes, seed=len(request.param))
    src = tmp_path_factory.mktemp("hf") / f"openelm-{request.param}"
    src.mkdir()
    save_file(weights, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(config))
    out, arch, n_params = import_checkpoint(src, tmp_path_factory.mktemp("imp") / "export")
    assert arch == "openelm"
    return config, shapes, weights, src, out, n_params


# ----------------------------------------------------------------------------- tests


def test_the_import_describes_the_checkpoint(imported):
    config, shapes, weights, _, out, n_params = imported
    _, _, cfg = float32_model_of_export(out)
    assert [(s.n_heads, s.n_kv_heads, s.mlp_dim) for s in cfg.layer_shapes()] == shapes
    assert cfg.layer_scaling.kind == "explicit" and cfg.head_dim == K and cfg.norm_eps == 1e-6
    assert cfg.qk_norm == config["normalize_qk_projections"]
    assert cfg.tie_embeddings == config["share_input_output_layers"]
    assert cfg.rope_theta == config["rope_freq_constant"]
    # Every tensor once (the fused ones split), embedding and head padded to 384 rows; the classifier skipped.
    padding = (384 - VOCAB) * D * (1 if cfg.tie_embeddings else 2)
    assert n_params == sum(v.size for k, v in weights.items() if "classifier" not in k) + padding


def test_logits_equal_the_openelm_equations(imported):
    config, shapes, weights, _, out, _ = imported
    model, params, _ = float32_model_of_export(out)
    ours_SV = np.asarray(model.apply({"params": params}, jnp.asarray(TOKENS_S[None]))[0][0, :, :VOCAB])
    theirs_SV = openelm_logits(weights, config, shapes, TOKENS_S)
    np.testing.assert_allclose(ours_SV, theirs_SV, atol=1e-4, rtol=1e-4)
    # The comparison can tell the conventions apart: each of these mistakes moves the logits far beyond it.
    for mistake in ("swap_glu", "swap_kv", "interleaved_rope"):
        wrong_SV = openelm_logits(weights, config, shapes, TOKENS_S, **{mistake: True})
        assert np.max(np.abs(wrong_SV - ours_SV)) > 1e-2, mistake


def test_cached_step_decoding_equals_the_openelm_equations(imported):
    config, shapes, weights, _, out, _ = imported
    model, params, cfg = float32_model_of_export(out)
    apply = jax.jit(model.apply)
    caches = init_caches(cfg, 1, len(TOKENS_S), jnp.float32)
    tokens = jnp.asarray(TOKENS_S[None])
    logits, caches, _ = apply({"params": params}, tokens[:, :PROMPT], jnp.arange(PROMPT)[None], caches)
    ours = [logits[0, -1]]
    for t in range(PROMPT, len(TOKENS_S)):
        logits, caches, _ = apply({"params": params}, tokens[:, t:t + 1], jnp.full((1, 1), t), caches)
        ours.append(logits[0, -1])
    theirs_SV = openelm_logits(weights, config, shapes, TOKENS_S)[PROMPT - 1:]
    np.testing.assert_allclose(np.stack(ours)[:, :VOCAB], theirs_SV, atol=1e-4, rtol=1e-4)


def test_an_unshared_head_is_tied_again_unless_tie_word_embeddings_is_false():
    """transformers ties lm_head to the embedding when loading unless tie_word_embeddings=false (its default is
    true); share_input_output_layers=true has no lm_head at all."""
    layout = ARCHITECTURES["openelm"]
    base = _config(num_query_heads=[2, 2, 2], num_kv_heads=[1, 1, 1], ffn_multipliers=1.0)
    assert layout({**base, "share_input_output_layers": True}, "src")[0].tie_embeddings
    assert layout({**base, "share_input_output_layers": False}, "src")[0].tie_embeddings
    untied = {**base, "share_input_output_layers": False, "tie_word_embeddings": False}
    assert not layout(untied, "src")[0].tie_embeddings


def _drop(weights, name):
    return {k: v for k, v in weights.items() if k != name}


@pytest.mark.parametrize("case, message", [
    ("missing", "tensor 'transformer.layers.1.attn.k_norm.weight' is missing (needed for layer_1/mixer/k_norm/scale)"),
    ("qkv_width", "tensor 'transformer.layers.2.attn.qkv_proj.weight' has shape (112, 64), which does not fit"),
    ("no_glu", "OpenELM with ffn_with_glu=false (an ungated MLP) is not supported"),
    ("heads", "config.json's num_query_heads must list one value per layer (num_transformer_layers=3), got 2 values"),
])
def test_bad_checkpoints_are_one_line_naming_the_problem(tmp_path, case, message):
    changes, shapes = CHECKPOINTS["tied"]
    config = _config(**changes)
    weights = _random_weights(config, shapes, seed=0)
    bad_weights, bad_config = dict(weights), dict(config)
    if case == "missing":
        bad_weights = _drop(weights, "transformer.layers.1.attn.k_norm.weight")
    elif case == "qkv_width":  # one KV head short: 112 rows where (4 + 2 x 2) x 16 = 128 are needed
        bad_weights["transformer.layers.2.attn.qkv_proj.weight"] = np.zeros((112, D), np.float32)
    elif case == "no_glu":
        bad_config["ffn_with_glu"] = False
    else:
        bad_config["num_query_heads"] = [2, 4]
    src = tmp_path / "bad"
    src.mkdir()
    save_file(bad_weights, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(bad_config))
    with pytest.raises(UserError) as error:
        import_checkpoint(src, tmp_path / "out")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing half-written
