"""Models assembled from registered mixers."""

from jaxeff.models.lm import DecoderLM, build_model, compute_dtype, flops_per_token, init_caches, padded_vocab_size

__all__ = ["DecoderLM", "build_model", "compute_dtype", "flops_per_token", "init_caches", "padded_vocab_size"]
