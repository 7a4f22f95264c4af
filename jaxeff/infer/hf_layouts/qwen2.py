"""Qwen2 as transformers saves it (model_type "qwen2") and the ParScale models built on it (model_type
"qwen2_parscale", QwenLM/ParScale's trust_remote_code release), onto attention (q/k/v biases) + SwiGLU layers and,
for `parscale_n` > 1, `model.parscale`.

The layout (read from transformers' Qwen2 and the ParScale release's configuration and modeling files):

- Attention: `self_attn.{q,k,v}_proj` with biases, `o_proj` without; query head h reads key/value head
  h // (H / G) (jaxeff's grouped-query pairing). RoPE rotates halves (x[i] with x[i + K/2]) with inverse
  frequencies rope_theta^(-2i/K), as jaxeff's; scores scale 1/sqrt(K), softmax in float32.
- RMSNorm `x / sqrt(mean(x^2) + rms_norm_eps) * weight` in float32 (input_layernorm before attention,
  post_attention_layernorm before the MLP, model.norm at the end), as jaxeff's.
- MLP: `down(silu(gate(x)) * up(x))`, no biases: jaxeff's swiglu with the same names.
- The head is `lm_head.weight` unless `tie_word_embeddings` (default false); transformers does not save a tied
  head, and one that is there anyway is what transformers ignores when loading, so it is accepted and skipped.
- ParScale (`parscale_n` = P > 1): `self_attn.prefix_k` / `prefix_v` [P, G, T, K] are each stream's learned keys
  and values (no RoPE; the real tokens keep positions 0, 1, ...), jaxeff's `stream_start` of the same shape.
  After model.norm, `aggregate_layer` = Linear(P D -> D), SiLU, Linear(D -> P) reads the P streams interleaved
  per feature (index d P + p), as jaxeff's StreamAggregate does: the torch weights transpose into its kernels.
  The stream weights are softmaxed in float32 and smoothed by `parscale_attn_smooth`.
"""

from __future__ import annotations

from typing import Any, Callable

from jaxeff.config import ModelConfig
from jaxeff.config.parscale import ParScaleConfig
from jaxeff.errors import UserError
from jaxeff.infer.hf_layouts.common import (TensorMap, Transform, head_kernel, linear, linear_to_heads, need, pad_rows,
                                            unused)


def layout(config: dict[str, Any], source: str) -> tuple[ModelConfig, Callable[[int], list[TensorMap]]]:
    _refuse_what_jaxeff_cannot_express(config, source)
    d = int(need(config, "hidden_size", source=source))
    n_layers = int(need(config, "num_hidden_layers", source=source))
    heads = int(need(config, "num_attention_heads", source=source))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if config.get("head_dim") is None and d % heads:
        raise UserError(f"{source}: hidden_size={d} is not divisible by num_attention_heads={heads} and config.json "
                        "has no head_dim; add the model's head_dim")
    head = int(config.get("head_dim") or d // heads)
    if heads % kv_heads:
        raise UserError(f"{source}: num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}; "
                        "fix config.json")
    tied = bool(config.get("tie_word_embeddings", False))  # Qwen2Config's and Qwen2ParScaleConfig's default
    streams = _parscale(config, source) if config.get("model_type") == "qwen2_parscale" else ParScaleConfig()
    model = ModelConfig(
        d_model=d, n_layers=n_layers, n_heads=heads, n_kv_heads=kv_heads, head_dim=head,
        mlp_dim=int(need(config, "intermediate_size", source=source)), mixer_pattern=["attention"],
        channel_mixer_pattern=["swiglu"], norm="rms", norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(config), tie_embeddings=tied, scale_embeddings=False, qkv_bias=True,
        vocab_size=int(need(config, "vocab_size", source=source)), parscale=streams)

    def bias(n: int) -> Transform:
        return lambda b: b.reshape(n, head)

    def tensors(padded_vocab: int) -> list[TensorMap]:
        out = [TensorMap("model.embed_tokens.weight", ("embed", "embedding"), pad_rows(padded_vocab)),
               TensorMap("model.norm.weight", ("final_norm", "scale"), lambda w: w)]
        if tied:
            out.append(unused("lm_head.weight"))
        else:
            out.append(TensorMap("lm_head.weight", ("head", "kernel"), head_kernel(padded_vocab)))
        for i in range(n_layers):
            hf, ours = f"model.layers.{i}.", f"layer_{i}"
            attn = f"{hf}self_attn."
            out += [
                TensorMap(f"{hf}input_layernorm.weight", (ours, "mixer_norm", "scale"), lambda w: w),
                TensorMap(f"{attn}q_proj.weight", (ours, "mixer", "q", "kernel"), linear((d, heads, head))),
                TensorMap(f"{attn}q_proj.bias", (ours, "mixer", "q", "bias"), bias(heads)),
                TensorMap(f"{attn}k_proj.weight", (ours, "mixer", "k", "kernel"), linear((d, kv_heads, head))),
                TensorMap(f"{attn}k_proj.bias", (ours, "mixer", "k", "bias"), bias(kv_heads)),
                TensorMap(f"{attn}v_proj.weight", (ours, "mixer", "v", "kernel"), linear((d, kv_heads, head))),
                TensorMap(f"{attn}v_proj.bias", (ours, "mixer", "v", "bias"), bias(kv_heads)),
                TensorMap(f"{attn}o_proj.weight", (ours, "mixer", "o", "kernel"), linear_to_heads(heads, head)),
                TensorMap(f"{hf}post_attention_layernorm.weight", (ours, "channel_norm", "scale"), lambda w: w),
                TensorMap(f"{hf}mlp.gate_proj.weight", (ours, "channel", "gate", "kernel"), lambda w: w.T),
                TensorMap(f"{hf}mlp.up_proj.weight", (ours, "channel", "up", "kernel"), lambda w: w.T),
                TensorMap(f"{hf}mlp.down_proj.weight", (ours, "channel", "down", "kernel"), lambda w: w.T),
            ]
            if streams.enabled:  # [P, G, T, K] in both
                out += [TensorMap(f"{attn}prefix_k", (ours, "stream_start", "prefix_k"), lambda w: w),
                        TensorMap(f"{attn}prefix_v", (ours, "stream_start", "prefix_v"), lambda w: w)]
        if streams.enabled:
            agg = ("parscale_aggregate",)
            out += [TensorMap("model.aggregate_layer.0.weight", (*agg, "hidden", "kernel"), lambda w: w.T),
                    TensorMap("model.aggregate_layer.0.bias", (*agg, "hidden", "bias"), lambda w: w),
                    TensorMap("model.aggregate_layer.2.weight", (*agg, "weights", "kernel"), lambda w: w.T),
                    TensorMap("model.aggregate_layer.2.bias", (*agg, "weights", "bias"), lambda w: w)]
        return out

    return model, tensors


def _parscale(config: dict[str, Any], source: str) -> ParScaleConfig:
    """model.parscale from the release's keys (Qwen2ParScaleConfig's defaults where absent)."""
    n, tokens = config.get("parscale_n", 1), config.get("parscale_n_tokens", 48)
    smooth = config.get("parscale_attn_smooth", 0.01)
    for key, value in (("parscale_n", n), ("parscale_n_tokens", tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{source}: config.json's {key}={value!r} must be a positive integer")
    if isinstance(smooth, bool) or not isinstance(smooth, (int, float)) or not 0 <= smooth < 1:
        raise UserError(f"{source}: config.json's parscale_attn_smooth={smooth!r} must be a number in [0, 1)")
    if n == 1:
        return ParScaleConfig()
    return ParScaleConfig(streams=n, prefix_tokens=tokens, attn_smooth=float(smooth))


def _rope_theta(config: dict[str, Any]) -> float:
    """`rope_theta` (transformers 4 and the ParScale release) or `rope_parameters.rope_theta` (transformers 5)."""
    parameters = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or parameters.get("rope_theta") or 10000.0)


def _refuse_what_jaxeff_cannot_express(config: dict[str, Any], source: str) -> None:
    activation = config.get("hidden_act", "silu")
    if activation != "silu":
        raise UserError(f"{source}: Qwen2 with hidden_act={activation!r} is not supported; only 'silu' (jaxeff's "
                        "swiglu), which every released Qwen2 uses")
    if config.get("rope_scaling") is not None:
        raise UserError(f"{source}: Qwen2 with rope_scaling={config['rope_scaling']!r} is not supported; jaxeff's "
                        "RoPE is unscaled: remove rope_scaling from config.json (the released default is null)")
    rope_type = (config.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise UserError(f"{source}: Qwen2 with rope_parameters.rope_type={rope_type!r} is not supported; jaxeff's "
                        "RoPE is unscaled ('default')")
    sliding = _sliding_layers(config)
    if sliding:
        layers = ", ".join(map(str, sliding[:4])) + (", ..." if len(sliding) > 4 else "")
        raise UserError(f"{source}: Qwen2 with use_sliding_window=true is not supported (layers {layers} would "
                        f"attend within sliding_window={config.get('sliding_window')} tokens; jaxeff's attention "
                        "layers see the whole context); the released models set it false")


def _sliding_layers(config: dict[str, Any]) -> list[int]:
    """The layers transformers gives a sliding window: none unless use_sliding_window and sliding_window are set;
    then those `layer_types` names "sliding_attention", or without that list layers from max_window_layers on."""
    if not config.get("use_sliding_window") or config.get("sliding_window") is None:
        return []
    n_layers = int(config.get("num_hidden_layers") or 0)
    types = config.get("layer_types")
    if isinstance(types, list):
        return [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    return list(range(int(config.get("max_window_layers", 28)), n_layers))
