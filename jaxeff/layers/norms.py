"""RMSNorm with a float32 reduction."""

import flax.linen as nn
import jax.numpy as jnp


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BSD):
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                             (x_BSD.shape[-1],), jnp.float32)
        x = x_BSD.astype(jnp.float32)
        x = x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps))
        return (x * scale_D).astype(self.dtype)


class SRMSNorm(nn.Module):
    """Scale-free RMSNorm (TransNormerLLM's SRMSNorm): x / sqrt(mean(x^2) + eps), no parameters."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    def __call__(self, x_BSD):
        x = x_BSD.astype(jnp.float32)
        return (x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps))).astype(self.dtype)


NORMS = {"rms": RMSNorm, "srms": SRMSNorm}
