"""Apple's OpenELM as released on the Hugging Face hub (model_type "openelm": apple/OpenELM-270M ... 3B and their
-Instruct variants, trust_remote_code models), onto attention + SwiGLU layers with explicit layer scaling.

The layout (read from the released configuration and modeling files; corenet's general_gpt is the same model):

- config.json gives every layer's shape: `num_query_heads` and `num_kv_heads` are per-layer lists, the SwiGLU width
  of layer i is `make_divisible(ffn_multipliers[i] * model_dim, ffn_dim_divisor)`. transformers' OpenELMConfig
  recomputes the head lists from `qkv_multipliers` and `num_gqa_groups` when it loads, so for a config.json without
  the lists they are derived the same way; in every released config.json the two agree.
- `transformer.layers.{i}.attn.qkv_proj.weight` [(H + 2 G) K, D] stacks the H query heads, then the G key heads,
  then the G value heads, K rows each. Query head h reads key/value head h // (H / G) (torch's repeat_interleave,
  which is how jaxeff's grouped-query attention pairs them too).
- q_norm / k_norm: RMSNorm over the head width with one [K] weight, after the split and before RoPE (jaxeff's
  `model.qk_norm`). Every RMSNorm has eps 1e-6 (fixed in the released code, no config key) and computes
  `x / sqrt(mean(x^2) + eps) * weight`, as jaxeff's.
- RoPE rotates halves (x[i] with x[i + K/2]), inverse frequencies `rope_freq_constant^(-2i/K)`: jaxeff's convention.
- `ffn.proj_1.weight` [2 F, D] stacks two halves; the first goes through SiLU ("swish") and multiplies the second:
  first half = jaxeff's `gate`, second = `up`; `ffn.proj_2` = `down`.
- The output layer is the token embedding when `share_input_output_layers` (all released models). Otherwise the
  head is `lm_head.weight`, unless `tie_word_embeddings` (transformers' default, true) ties that head to the
  embedding again when loading; `transformer.classifier.weight`, which the unshared model also creates and never
  reads, is accepted and skipped.
"""

from __future__ import annotations

from typing import Any, Callable

from jaxeff.config import ModelConfig
from jaxeff.config.layer_scaling import LayerScalingConfig, linspace_2dp, make_divisible
from jaxeff.errors import UserError
from jaxeff.infer.hf_layouts.common import (TensorMap, fused_rows, head_kernel, linear_to_heads, need, pad_rows,
                                            unused)

NORM_EPS = 1e-6  # every OpenELMRMSNorm's: the released code has no setting for it


def layout(config: dict[str, Any], source: str) -> tuple[ModelConfig, Callable[[int], list[TensorMap]]]:
    _refuse_what_jaxeff_cannot_express(config, source)
    n_layers = int(need(config, "num_transformer_layers", source=source))
    d = int(need(config, "model_dim", source=source))
    head = int(need(config, "head_dim", source=source))
    query_heads, kv_heads = _heads(config, n_layers, d, head, source)
    multipliers = _per_layer_multipliers(config, n_layers, source)
    divisor = int(config.get("ffn_dim_divisor", 256))
    mlp_dims = [int(make_divisible(m * d, divisor)) for m in multipliers]
    qk_norm = bool(config.get("normalize_qk_projections", False))
    shared = bool(config.get("share_input_output_layers", False))
    tied = shared or bool(config.get("tie_word_embeddings", True))
    model = ModelConfig(
        d_model=d, n_layers=n_layers, head_dim=head, n_heads=query_heads[-1], n_kv_heads=kv_heads[-1],
        mlp_dim=mlp_dims[-1], mixer_pattern=["attention"], channel_mixer_pattern=["swiglu"], norm="rms",
        norm_eps=NORM_EPS, qk_norm=qk_norm, rope_theta=float(config.get("rope_freq_constant", 10000)),
        tie_embeddings=tied, scale_embeddings=False, vocab_size=int(need(config, "vocab_size", source=source)),
        layer_scaling=LayerScalingConfig(kind="explicit", query_heads=query_heads, kv_heads=kv_heads,
                                         mlp_dims=mlp_dims))

    def tensors(padded_vocab: int) -> list[TensorMap]:
        out = [TensorMap("transformer.token_embeddings.weight", ("embed", "embedding"), pad_rows(padded_vocab)),
               TensorMap("transformer.norm.weight", ("final_norm", "scale"), lambda w: w)]
        if not tied:
            out.append(TensorMap("lm_head.weight", ("head", "kernel"), head_kernel(padded_vocab)))
        elif not shared:  # tie_word_embeddings: transformers replaces this head by the embedding when loading
            out.append(unused("lm_head.weight"))
        if not shared:
            out.append(unused("transformer.classifier.weight"))
        for i, (h, g, f) in enumerate(zip(query_heads, kv_heads, mlp_dims)):
            hf, ours = f"transformer.layers.{i}.", f"layer_{i}"
            rows = (h + 2 * g) * head
            out += [
                TensorMap(f"{hf}attn_norm.weight", (ours, "mixer_norm", "scale"), lambda w: w),
                TensorMap(f"{hf}attn.qkv_proj.weight", (ours, "mixer", "q", "kernel"),
                          fused_rows(rows, 0, h * head, (d, h, head))),
                TensorMap(f"{hf}attn.qkv_proj.weight", (ours, "mixer", "k", "kernel"),
                          fused_rows(rows, h * head, (h + g) * head, (d, g, head))),
                TensorMap(f"{hf}attn.qkv_proj.weight", (ours, "mixer", "v", "kernel"),
                          fused_rows(rows, (h + g) * head, rows, (d, g, head))),
                TensorMap(f"{hf}attn.out_proj.weight", (ours, "mixer", "o", "kernel"), linear_to_heads(h, head)),
                TensorMap(f"{hf}ffn_norm.weight", (ours, "channel_norm", "scale"), lambda w: w),
                TensorMap(f"{hf}ffn.proj_1.weight", (ours, "channel", "gate", "kernel"),
                          fused_rows(2 * f, 0, f, (d, f))),
                TensorMap(f"{hf}ffn.proj_1.weight", (ours, "channel", "up", "kernel"),
                          fused_rows(2 * f, f, 2 * f, (d, f))),
                TensorMap(f"{hf}ffn.proj_2.weight", (ours, "channel", "down", "kernel"), lambda w: w.T),
            ]
            if qk_norm:
                out += [TensorMap(f"{hf}attn.q_norm.weight", (ours, "mixer", "q_norm", "scale"), lambda w: w),
                        TensorMap(f"{hf}attn.k_norm.weight", (ours, "mixer", "k_norm", "scale"), lambda w: w)]
        return out

    return model, tensors


def _refuse_what_jaxeff_cannot_express(config: dict[str, Any], source: str) -> None:
    if not config.get("ffn_with_glu", True):
        raise UserError(f"{source}: OpenELM with ffn_with_glu=false (an ungated MLP) is not supported; jaxeff's "
                        "channel mixers are gated (every released OpenELM has ffn_with_glu=true)")
    activation = config.get("activation_fn_name", "swish")
    if activation not in ("swish", "silu"):
        raise UserError(f"{source}: OpenELM with activation_fn_name={activation!r} is not supported; only 'swish' "
                        "(SiLU, jaxeff's swiglu), which every released OpenELM uses")
    norm = config.get("normalization_layer_name", "rms_norm")
    if norm != "rms_norm":
        raise UserError(f"{source}: OpenELM with normalization_layer_name={norm!r} is not supported; only "
                        "'rms_norm', which every released OpenELM uses")


def _heads(config: dict[str, Any], n_layers: int, d: int, head: int, source: str) -> tuple[list[int], list[int]]:
    """Per-layer (query heads, key/value heads): config.json's lists, or derived as OpenELMConfig derives them."""
    if config.get("num_query_heads") is not None or config.get("num_kv_heads") is not None:
        query = _int_list(config, "num_query_heads", n_layers, source)
        kv = _int_list(config, "num_kv_heads", n_layers, source)
    else:
        groups = int(config.get("num_gqa_groups", 1))
        multipliers = config.get("qkv_multipliers", 1.0)
        if isinstance(multipliers, (int, float)):
            multipliers = [multipliers] * n_layers
        elif isinstance(multipliers, list) and len(multipliers) == 2:
            multipliers = linspace_2dp(float(multipliers[0]), float(multipliers[1]), n_layers)
        else:
            raise UserError(f"{source}: config.json's qkv_multipliers={multipliers!r} is neither one number nor "
                            "[first, last]; give num_query_heads and num_kv_heads (one value per layer) instead")
        query = [int(make_divisible(d * m, head * groups)) // head for m in multipliers]
        kv = [q // groups for q in query]
    for i, (q, g) in enumerate(zip(query, kv)):
        if g < 1 or q % g:
            raise UserError(f"{source}: layer {i} has num_query_heads={q} and num_kv_heads={g}; grouped-query "
                            "attention needs the key/value heads to divide the query heads; fix config.json")
    return query, kv


def _per_layer_multipliers(config: dict[str, Any], n_layers: int, source: str) -> list[float]:
    """`ffn_multipliers`: one number for all layers, [first, last] spaced as OpenELMConfig does, or one per layer."""
    value = config.get("ffn_multipliers", 4.0)
    if isinstance(value, (int, float)):
        return [float(value)] * n_layers
    if isinstance(value, list) and len(value) == 2:
        return linspace_2dp(float(value[0]), float(value[1]), n_layers)
    if isinstance(value, list) and len(value) == n_layers:
        return [float(v) for v in value]
    raise UserError(f"{source}: config.json's ffn_multipliers has {len(value) if isinstance(value, list) else 0} "
                    f"values for num_transformer_layers={n_layers}; give one number, [first, last] or one per layer")


def _int_list(config: dict[str, Any], key: str, n_layers: int, source: str) -> list[int]:
    value = need(config, key, source=source)
    if not isinstance(value, list) or len(value) != n_layers:
        got = f"{len(value)} values" if isinstance(value, list) else repr(value)
        raise UserError(f"{source}: config.json's {key} must list one value per layer "
                        f"(num_transformer_layers={n_layers}), got {got}")
    return [int(v) for v in value]
