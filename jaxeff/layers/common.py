"""Parameter helpers shared by mixers: initializers and projections that carry logical axis names."""

import flax.linen as nn
import jax.numpy as jnp

# Logical axis names of the mixers' per-head activations (jaxeff.parallel.sharding maps them to mesh axes).
BSHK_AXES = ("batch", "length", "heads", "head_dim")  # queries, keys, values, outputs [B, S, H, K or W]
BSH_AXES = ("batch", "length", "heads")  # per-head gates [B, S, H]


def normal_init(std: float, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def projection(features, axis, axes: tuple[str, ...], std: float, dtype, name: str,
               bias: bool = False) -> nn.DenseGeneral:
    """A DenseGeneral with float32 parameters, computing in `dtype`; bias-free unless `bias` (then zero-initialised,
    split like the output features: the last `len(features)` logical axes)."""
    n_out = len(features) if isinstance(features, tuple) else 1
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros, axes[-n_out:])
    return nn.DenseGeneral(features=features, axis=axis, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                           kernel_init=normal_init(std, axes), bias_init=bias_init, name=name)


def head_dim(cfg) -> int:
    """Per-head width: model.head_dim, or d_model / n_heads."""
    return cfg.head_dim or cfg.d_model // cfg.n_heads


def output_std(cfg) -> float:
    """Residual-branch output projections start smaller so the residual stream does not grow with depth."""
    return cfg.init_std / (2 * cfg.n_layers) ** 0.5
