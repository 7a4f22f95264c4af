"""Autoregressive decoding of a `DecoderLM` with per-layer caches: one prefill over the prompt, then one token a step.

Used by the LM task (the sample at the end of training) and by `jaxeff generate`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.layers.registry import TOKEN_MIXERS, token_mixer_for_layer
from jaxeff.models.lm import init_caches
from jaxeff.models.parscale import start_caches


def sample_next(logits_BV, key, temperature: float, top_k: int, vocab_size: int):
    """Greedy when temperature == 0; otherwise temperature + optional top-k sampling (a top-k at or
    above the vocabulary size keeps every token).

    Ids past the tokenizer's vocabulary (padding of the embedding table) are never produced.
    """
    logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_size, logits_BV, -jnp.inf)
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    if 0 < top_k < vocab_size:  # top_k >= the vocabulary filters nothing
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1)


def decode_caches(model, params, batch: int, max_len: int) -> list:
    """The caches decoding starts from: empty ones, or under ParScale each stream's learned start (B P rows)."""
    if model.cfg.parscale.enabled:
        return start_caches(model.cfg, params, batch, max_len, model.dtype)
    return init_caches(model.cfg, batch, max_len, model.dtype)


def make_forward(model):
    """Jitted (params, tokens_BS, positions_BS, caches) -> (last-position logits_BV, caches)."""

    @jax.jit
    def forward(params, tokens_BS, positions_BS, caches):
        logits_BSV, caches, _ = model.apply({"params": params}, tokens_BS, positions_BS, caches)
        return logits_BSV[:, -1], caches

    return forward


def generate_ids(model, params, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int = 0, seed: int = 0, vocab_size: int | None = None, stop_id: int | None = None,
                 max_len: int | None = None) -> list[int]:
    """Return the generated ids (prompt excluded). `max_len` bounds the cache (default: exactly enough)."""
    cfg = model.cfg
    vocab_size = vocab_size or model.vocab_size
    max_len = max_len or len(prompt_ids) + max_new_tokens
    caches = decode_caches(model, params, 1, max_len)
    forward = make_forward(model)
    prompt_1S = jnp.asarray([prompt_ids], jnp.int32)
    logits_1V, caches = forward(params, prompt_1S, jnp.arange(len(prompt_ids))[None], caches)
    key = jax.random.key(seed)
    out = []
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token = int(sample_next(logits_1V, sub, temperature, top_k, vocab_size)[0])
        if stop_id is not None and token == stop_id:
            break
        out.append(token)
        if i + 1 == max_new_tokens:
            break
        pos = len(prompt_ids) + i
        logits_1V, caches = forward(params, jnp.asarray([[token]], jnp.int32), jnp.asarray([[pos]]), caches)
    return out


def generate_text(model, params, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
                  seed: int) -> str:
    prompt_ids = [tokenizer.bos_id, *np.asarray(tokenizer.encode(prompt)).tolist()]
    ids = generate_ids(model, params, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                       vocab_size=tokenizer.vocab_size, stop_id=tokenizer.eos_id)
    return prompt + tokenizer.decode(ids)


def cache_report(cfg, max_len: int, dtype=jnp.float32) -> str | None:
    """'decode cache X for N tokens (a dense KV cache: Y)' when some layer keeps a pruned cache (S2, sink +
    window); None otherwise. Per sequence, all layers."""
    specs = [token_mixer_for_layer(cfg, i) for i in range(cfg.n_layers)]
    if not any(spec.cache_kind == "pruned" for spec in specs):
        return None

    def nbytes(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))

    caches = init_caches(cfg, 1, max_len, dtype)
    dense_kv = TOKEN_MIXERS["attention"].init_cache
    used = sum(nbytes(c) for c in caches)
    dense = sum(nbytes(dense_kv(cfg.for_layer(i), i, 1, max_len, dtype)) if spec.cache_kind == "pruned" else nbytes(c)
                for i, (spec, c) in enumerate(zip(specs, caches)))
    return (f"decode cache {used / 2**10:,.1f} KiB for {max_len} tokens (a dense KV cache: {dense / 2**10:,.1f} KiB, "
            f"{used / dense:.0%})")
