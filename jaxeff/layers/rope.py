"""Rotary position embeddings (half-split layout)."""

import jax.numpy as jnp


def apply_rope(x_BSHK, positions_BS, theta: float):
    """Rotate pairs (x[..., i], x[..., i + K/2]) by angle position * theta^(-2i/K), in float32.

    x_BSHK: queries or keys (H may be G, the KV heads).
    """
    d = x_BSHK.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    angle = positions_BS[..., None].astype(jnp.float32) * inv_freq  # [B, S, K/2]: one angle per rotated pair
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x = x_BSHK.astype(jnp.float32)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BSHK.dtype)
