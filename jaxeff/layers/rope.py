"""Rotary position embeddings (half-split layout)."""

import jax.numpy as jnp


def apply_rope(x_BSHD, positions_BS, theta: float):
    """Rotate pairs (x[..., i], x[..., i + D/2]) by angle position * theta^(-2i/D), in float32."""
    d = x_BSHD.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    angle_BSF = positions_BS[..., None].astype(jnp.float32) * inv_freq
    sin, cos = jnp.sin(angle_BSF)[:, :, None, :], jnp.cos(angle_BSF)[:, :, None, :]
    x = x_BSHD.astype(jnp.float32)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BSHD.dtype)
