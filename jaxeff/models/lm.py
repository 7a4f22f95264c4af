"""Decoder-only language model: embed -> [norm, token mixer, norm, channel mixer] x L -> norm -> logits."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxeff.layers  # noqa: F401  (registers the built-in mixers)
from jaxeff.config import ConfigError, ModelConfig
from jaxeff.layers.common import normal_init
from jaxeff.layers.norms import NORMS
from jaxeff.layers.registry import channel_mixer_for_layer, specs_in_use, token_mixer_for_layer
from jaxeff.models.parscale import (StreamAggregate, aggregate_flops_per_token, learned_start_cache, repeat_streams,
                                    start_flops_per_token)
from jaxeff.parallel.sharding import sequence_shards, with_logical_constraint

# The residual stream stays split by batch rows only; without this hint GSPMD may shard its width
# over "fsdp" and then reshard it for every tensor-parallel matmul.
RESIDUAL_AXES = ("batch", "length", "activation_embed")

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def compute_dtype(cfg: ModelConfig, platform: str | None = None) -> jnp.dtype:
    """'auto' is bfloat16 on accelerators and float32 on CPU (bf16 is not faster there)."""
    if cfg.compute_dtype == "auto":
        platform = platform or jax.default_backend()
        return jnp.float32 if platform == "cpu" else jnp.bfloat16
    return jnp.dtype(cfg.compute_dtype)


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


class Embedding(nn.Module):
    """Token embedding whose table is gathered over "fsdp" before the lookup.

    With the table's width sharded (FSDP), a plain gather would leave the activations sharded by
    width, and moving them to batch sharding costs GSPMD a full rematerialisation.
    """

    vocab_size: int
    features: int
    init_std: float
    dtype: Any

    def setup(self):
        self.embedding = self.param("embedding", normal_init(self.init_std, ("vocab", "embed")),
                                    (self.vocab_size, self.features), jnp.float32)

    def _table_VD(self):
        return with_logical_constraint(self.embedding, ("vocab", "activation_embed")).astype(self.dtype)

    def __call__(self, tokens_BS):
        return jnp.take(self._table_VD(), tokens_BS, axis=0)

    def output_matrix(self):
        """The table as the output layer's weight: ([V, D] in the compute dtype, its einsum letters)."""
        return self._table_VD(), "vd"


class OutputHead(nn.Module):
    """The untied output layer's weight [D, V] (the parameter `head/kernel`, where nn.DenseGeneral kept it)."""

    vocab_size: int
    features: int
    init_std: float
    dtype: Any

    @nn.compact
    def __call__(self):
        kernel_DV = self.param("kernel", normal_init(self.init_std, ("embed", "vocab")),
                               (self.features, self.vocab_size), jnp.float32)
        # Gathered over fsdp x sequence once, here: left to the partitioner, the gather (and its gradient's
        # reduce-scatter) went inside the loss's chunk loop, once per chunk (an xLSTM plan for h100x8 sent 15.5 GiB
        # per step at 1M tokens against 8.4 at 128K; with this line the same at both).
        return with_logical_constraint(kernel_DV, ("activation_embed", "vocab")).astype(self.dtype), "dv"


def output_logits(x_BSD, weight, letters: str, soft_cap: float | None):
    """Float32 logits [..., V] of the final hidden states: x @ weight (`letters` "vd" or "dv"), soft-capped."""
    logits = jnp.einsum(f"...d,{letters}->...v", x_BSD, weight).astype(jnp.float32)
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    return logits


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def token_losses(x_BSD, weight, letters: str, soft_cap: float | None, targets_BS, chunk: int):
    """Next-token cross entropy per token [B, S] (float32). With `chunk` > 0 the logits exist for at most that many
    tokens per device at a time, and are recomputed in the backward: the tokens are viewed as [B, G, n, c] with G
    the sequence shards (the axis that stays split) and a loop over the n chunks of c tokens of every device."""
    def losses(x, t, w):
        return optax.softmax_cross_entropy_with_integer_labels(output_logits(x, w, letters, soft_cap), t)

    if not chunk:
        return losses(x_BSD, targets_BS, weight)
    b, s, d = x_BSD.shape
    g = sequence_shards()
    c = _largest_divisor_at_most(s // g, chunk)
    n = s // g // c
    x_NBGCD = x_BSD.reshape(b, g, n, c, d).transpose(2, 0, 1, 3, 4)
    t_NBGC = targets_BS.reshape(b, g, n, c).transpose(2, 0, 1, 3)
    one_chunk = jax.checkpoint(losses)
    ce_NBGC = jax.lax.map(lambda xt: one_chunk(xt[0], xt[1], weight), (x_NBGCD, t_NBGC))
    return ce_NBGC.transpose(1, 2, 0, 3).reshape(b, s)


class Block(nn.Module):
    cfg: ModelConfig
    layer_index: int
    dtype: Any

    @nn.compact
    def __call__(self, x_BSD, positions_BS, cache):
        i = self.layer_index
        cfg = self.cfg.for_layer(i)
        mixer = token_mixer_for_layer(cfg, i).module(cfg=cfg, layer_index=i, dtype=self.dtype, name="mixer")
        channel = channel_mixer_for_layer(cfg, i).module(cfg=cfg, layer_index=i, dtype=self.dtype, name="channel")
        norm = NORMS[cfg.norm]
        if cache is None and cfg.parscale.enabled:  # each ParScale stream starts from its learned prefix or state
            cache = learned_start_cache(cfg, i, x_BSD.shape[0], x_BSD.shape[1], self.dtype)
        y_BSD, cache = mixer(norm(cfg.norm_eps, self.dtype, name="mixer_norm")(x_BSD), positions_BS, cache)
        x_BSD = x_BSD + y_BSD
        y_BSD, aux = channel(norm(cfg.norm_eps, self.dtype, name="channel_norm")(x_BSD))
        return x_BSD + y_BSD, cache, aux


def block_name(layer: int) -> str:
    """The name (and parameter subtree) of a DecoderLM's block `layer`."""
    return f"layer_{layer}"


def is_block_name(name: str) -> bool:
    return name.startswith("layer_") and name[len("layer_"):].isdigit()


class DecoderLM(nn.Module):
    """Returns (logits_BSV in float32, new caches or None, aux dict of scalars summed over layers); given
    `targets_BS`, the per-token cross entropy [B, S] in place of the logits (training: `model.loss_chunk` bounds
    the logits held at once)."""

    cfg: ModelConfig
    vocab_size: int  # already padded
    dtype: Any = jnp.float32
    # A transform of each block's parameters, run inside the block (and inside its remat): LoRA merges its adapters
    # there, so a merged copy of one layer's weights lives only while that layer runs (jaxeff/train/lora.py).
    block_params: Callable[[Any], Any] | None = None

    @nn.compact
    def __call__(self, tokens_BS, positions_BS=None, caches=None, targets_BS=None):
        cfg = self.cfg
        if positions_BS is None:
            positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1]), tokens_BS.shape)
        embed = Embedding(self.vocab_size, cfg.d_model, cfg.init_std, self.dtype, name="embed")
        x_BSD = embed(tokens_BS)
        if cfg.scale_embeddings:
            x_BSD = x_BSD * jnp.asarray(cfg.d_model**0.5, x_BSD.dtype)
        streams = cfg.parscale.streams
        if streams > 1:  # rows become B P (batch-major); "x_BSD" below holds them until the streams are aggregated
            x_BSD, positions_BS = repeat_streams(x_BSD, streams), repeat_streams(positions_BS, streams)
        x_BSD = with_logical_constraint(x_BSD, RESIDUAL_AXES)

        block_cls = Block
        if self.block_params is not None:
            block_cls = nn.map_variables(Block, "params", trans_in_fn=self.block_params, mutable=False)
        if cfg.remat != "none":
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=True)
        new_caches, aux_total = [], {}
        for i in range(cfg.n_layers):
            cache = None if caches is None else caches[i]
            x_BSD, cache, aux = block_cls(cfg, i, self.dtype, name=block_name(i))(x_BSD, positions_BS, cache)
            x_BSD = with_logical_constraint(x_BSD, RESIDUAL_AXES)
            new_caches.append(cache)
            for k, v in aux.items():
                aux_total[k] = aux_total.get(k, 0.0) + v

        x_BSD = NORMS[cfg.norm](cfg.norm_eps, self.dtype, name="final_norm")(x_BSD)
        if streams > 1:
            x_BSD = StreamAggregate(streams, cfg.parscale.attn_smooth, cfg.init_std, self.dtype,
                                    name="parscale_aggregate")(x_BSD)
            x_BSD = with_logical_constraint(x_BSD, RESIDUAL_AXES)
        if cfg.tie_embeddings:
            weight, letters = embed.output_matrix()
        else:
            weight, letters = OutputHead(self.vocab_size, cfg.d_model, cfg.init_std, self.dtype, name="head")()
        if targets_BS is not None:
            return token_losses(x_BSD, weight, letters, cfg.logit_soft_cap, targets_BS, cfg.loss_chunk), None, aux_total
        logits_BSV = output_logits(x_BSD, weight, letters, cfg.logit_soft_cap)
        return logits_BSV, (None if caches is None else new_caches), aux_total


def model_vocab_size(cfg: ModelConfig, tokenizer_vocab: int) -> int:
    """Embedding rows before padding: model.vocab_size when set (a released model's), else the tokenizer's."""
    if cfg.vocab_size is None:
        return tokenizer_vocab
    if cfg.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer_vocab} ids); raise it or set it to null")
    return cfg.vocab_size


def build_model(cfg: ModelConfig, vocab_size: int, platform: str | None = None) -> DecoderLM:
    """`vocab_size`: the tokenizer's; model.vocab_size overrides it (see model_vocab_size)."""
    vocab = model_vocab_size(cfg, vocab_size)
    return DecoderLM(cfg, padded_vocab_size(vocab, cfg.vocab_multiple), compute_dtype(cfg, platform))


def decoding_config(cfg: ModelConfig) -> ModelConfig:
    """The config a model that decodes is built from: each channel mixer's `for_decoding` applied (MoE: dropless),
    so that a call over several tokens gives each token what one-token calls give it."""
    for spec in specs_in_use(cfg):
        if getattr(spec, "for_decoding", None) is not None:  # a channel mixer's hook
            cfg = spec.for_decoding(cfg)
    return cfg


def init_caches(cfg: ModelConfig, batch: int, max_len: int, dtype) -> list:
    """Empty decode caches (a ParScale model starts from its learned ones: jaxeff.models.decoding.decode_caches)."""
    return [token_mixer_for_layer(cfg, i).init_cache(cfg.for_layer(i), i, batch, max_len, dtype)
            for i in range(cfg.n_layers)]


def inactive_params(cfg: ModelConfig) -> int:
    """Parameters a token does not use (MoE experts it is not routed to): total minus this = active per token."""
    specs = [channel_mixer_for_layer(cfg, i) for i in range(cfg.n_layers)]
    return sum(spec.inactive_params(cfg.for_layer(i), i) for i, spec in enumerate(specs)
               if spec.inactive_params is not None)


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Forward matmul FLOPs per token (embedding lookup is free; the output head is not). ParScale: the layers once
    per stream, each reading its learned start, plus the aggregation; the head once."""
    layers = sum(layer_flops_per_token(cfg, seq_len, i) for i in range(cfg.n_layers))
    head = 2 * cfg.d_model * padded_vocab_size(model_vocab_size(cfg, vocab_size), cfg.vocab_multiple)
    if not cfg.parscale.enabled:
        return layers + head
    starts = sum(start_flops_per_token(cfg, i) for i in range(cfg.n_layers))
    return cfg.parscale.streams * (layers + starts) + aggregate_flops_per_token(cfg) + head



def layer_flops_per_token(cfg: ModelConfig, seq_len: int, layer: int) -> float:
    """Forward matmul FLOPs per token of one block (its own widths under model.layer_scaling)."""
    layer_cfg = cfg.for_layer(layer)
    return (token_mixer_for_layer(cfg, layer).flops_per_token(layer_cfg, seq_len, layer)
            + channel_mixer_for_layer(cfg, layer).flops_per_token(layer_cfg, layer))
