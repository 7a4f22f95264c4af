"""transformers' xLSTM layout (model_type "xlstm"), which the released NX-AI/xLSTM-7b checkpoint uses."""

from __future__ import annotations

from typing import Any, Callable

from jaxeff.config import MlstmConfig, ModelConfig
from jaxeff.errors import UserError
from jaxeff.infer.hf_layouts.common import TensorMap, head_kernel, linear, linear_to_heads, need, pad_rows


def layout(config: dict[str, Any], source: str) -> tuple[ModelConfig, Callable[[int], list[TensorMap]]]:
    if config.get("use_bias"):
        raise UserError(f"{source}: xLSTM with use_bias=true is not supported (the released models have none)")
    if config.get("weight_mode", "single") != "single":
        raise UserError(f"{source}: xLSTM weight_mode={config['weight_mode']!r} is not supported; only 'single'")
    d = int(need(config, "hidden_size", "embedding_dim", source=source))
    heads = int(need(config, "num_heads", source=source))
    n_layers = int(need(config, "num_hidden_layers", "num_blocks", source=source))
    multiple = int(config.get("ffn_round_up_to_multiple_of", 64))
    mlp = int(((d * float(config.get("ffn_proj_factor", 2.667)) + multiple - 1) // multiple) * multiple)
    section = MlstmConfig(qk_dim_factor=float(config.get("qk_dim_factor", 0.5)),
                          v_dim_factor=float(config.get("v_dim_factor", 1.0)),
                          gate_soft_cap=config.get("gate_soft_cap", 15.0), cell_eps=float(config.get("eps", 1e-6)),
                          norm_eps=float(config.get("norm_eps", 1e-6)),
                          chunk_size=int(config.get("chunk_size", 64)))
    model = ModelConfig(d_model=d, n_layers=n_layers, n_heads=heads, mlp_dim=mlp, mixer_pattern=["mlstm"],
                        channel_mixer_pattern=["swiglu"], tie_embeddings=False, norm="rms",
                        norm_eps=float(config.get("norm_eps", 1e-6)),
                        logit_soft_cap=config.get("output_logit_soft_cap"),
                        vocab_size=int(need(config, "vocab_size", source=source)), mlstm=section)
    dk, dv = section.head_dims(d, heads)

    def tensors(padded_vocab: int) -> list[TensorMap]:
        out = [TensorMap("backbone.embeddings.weight", ("embed", "embedding"), pad_rows(padded_vocab)),
               TensorMap("backbone.out_norm.weight", ("final_norm", "scale"), lambda w: w),
               TensorMap("lm_head.weight", ("head", "kernel"), head_kernel(padded_vocab))]
        for i in range(n_layers):
            hf, ours = f"backbone.blocks.{i}.", f"layer_{i}"
            layer = f"{hf}mlstm_layer."
            out += [
                TensorMap(f"{hf}norm_mlstm.weight", (ours, "mixer_norm", "scale"), lambda w: w),
                TensorMap(f"{layer}q.weight", (ours, "mixer", "q", "kernel"), linear((d, heads, dk))),
                TensorMap(f"{layer}k.weight", (ours, "mixer", "k", "kernel"), linear((d, heads, dk))),
                TensorMap(f"{layer}v.weight", (ours, "mixer", "v", "kernel"), linear((d, heads, dv))),
                TensorMap(f"{layer}ogate_preact.weight", (ours, "mixer", "ogate", "kernel"), linear((d, heads, dv))),
                TensorMap(f"{layer}igate_preact.weight", (ours, "mixer", "igate", "kernel"), lambda w: w.T),
                TensorMap(f"{layer}igate_preact.bias", (ours, "mixer", "igate", "bias"), lambda w: w),
                TensorMap(f"{layer}fgate_preact.weight", (ours, "mixer", "fgate", "kernel"), lambda w: w.T),
                TensorMap(f"{layer}fgate_preact.bias", (ours, "mixer", "fgate", "bias"), lambda w: w),
                TensorMap(f"{layer}multihead_norm.weight", (ours, "mixer", "norm", "scale"),
                          lambda w: w.reshape(heads, dv)),
                TensorMap(f"{layer}out_proj.weight", (ours, "mixer", "out", "kernel"), linear_to_heads(heads, dv)),
                TensorMap(f"{hf}norm_ffn.weight", (ours, "channel_norm", "scale"), lambda w: w),
                TensorMap(f"{hf}ffn.proj_up_gate.weight", (ours, "channel", "gate", "kernel"), lambda w: w.T),
                TensorMap(f"{hf}ffn.proj_up.weight", (ours, "channel", "up", "kernel"), lambda w: w.T),
                TensorMap(f"{hf}ffn.proj_down.weight", (ours, "channel", "down", "kernel"), lambda w: w.T),
            ]
        return out

    return model, tensors
