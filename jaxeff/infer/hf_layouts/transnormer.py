"""OpenNLPLab's released TransNormerLLM layout (model_type "transnormer", trust_remote_code models), onto the
lightning model."""

from __future__ import annotations

from typing import Any, Callable

from jaxeff.config import LightningConfig, ModelConfig
from jaxeff.errors import UserError
from jaxeff.infer.hf_layouts.common import TensorMap, Transform, head_kernel, linear_to_heads, need, pad_rows


def layout(config: dict[str, Any], source: str) -> tuple[ModelConfig, Callable[[int], list[TensorMap]]]:
    if config.get("bias"):
        raise UserError(f"{source}: TransNormerLLM with bias=true is not supported (the released models have none)")
    if config.get("norm_type", "simplermsnorm") != "simplermsnorm":
        raise UserError(f"{source}: TransNormerLLM norm_type={config['norm_type']!r} is not supported; "
                        "only 'simplermsnorm'")
    d = int(need(config, "decoder_embed_dim", source=source))
    heads = int(need(config, "decoder_attention_heads", source=source))
    n_layers = int(need(config, "decoder_layers", source=source))
    hidden = int(config.get("hidden_dim", d))
    if hidden % heads:
        raise UserError(f"{source}: hidden_dim={hidden} is not divisible by decoder_attention_heads={heads}")
    head = hidden // heads
    lrpe = [i for i, use in enumerate(config.get("linear_use_lrpe_list") or []) if use]
    tied = bool(config.get("tie_word_embeddings", True))
    model = ModelConfig(d_model=d, n_layers=n_layers, n_heads=heads, head_dim=head,
                        mlp_dim=int(need(config, "glu_dim", source=source)), mixer_pattern=["lightning"],
                        channel_mixer_pattern=["sglu"], norm="srms", scale_embeddings=not config.get("no_scale_embedding"),
                        tie_embeddings=tied, vocab_size=int(need(config, "vocab_size", source=source)),
                        lightning=LightningConfig(decay_convention="code", lrpe_layers=lrpe))

    def qkvu(part: int) -> Transform:
        return lambda w: w[part * hidden:(part + 1) * hidden].T.reshape(d, heads, head)

    def tensors(padded_vocab: int) -> list[TensorMap]:
        out = [TensorMap("model.embed_tokens.weight", ("embed", "embedding"), pad_rows(padded_vocab))]
        if not tied:
            out.append(TensorMap("lm_head.weight", ("head", "kernel"), head_kernel(padded_vocab)))
        for i in range(n_layers):
            hf, ours = f"model.layers.{i}.", f"layer_{i}"
            out += [TensorMap(f"{hf}token_mixer.qkvu_proj.weight", (ours, "mixer", name, "kernel"), qkvu(j))
                    for j, name in enumerate(("q", "k", "v", "u"))]
            out += [
                TensorMap(f"{hf}token_mixer.out_proj.weight", (ours, "mixer", "o", "kernel"),
                          linear_to_heads(heads, head)),
                TensorMap(f"{hf}channel_mixer.l1.weight", (ours, "channel", "gate", "kernel"), lambda w: w.T),
                TensorMap(f"{hf}channel_mixer.l2.weight", (ours, "channel", "up", "kernel"), lambda w: w.T),
                TensorMap(f"{hf}channel_mixer.l3.weight", (ours, "channel", "down", "kernel"), lambda w: w.T),
            ]
            if i in lrpe:
                out.append(TensorMap(f"{hf}token_mixer.lrpe.theta", (ours, "mixer", "lrpe_theta"),
                                     lambda w: w.reshape(heads, head)))
        return out

    return model, tensors
