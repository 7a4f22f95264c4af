"""What the ops' sequence-parallel forms share: where this device's chunk sits among the devices of a mesh axis
that splits the sequence, and the one collective they use.

A sharded form runs inside a `shard_map` whose in/out specs split axis 1 (the sequence) of its [B, S, ...]
operands into equal, contiguous chunks over `axis_name`: device g holds tokens [g L, (g + 1) L) of every row.
Gradients need no custom rule: the transpose of `all_gather` is a reduce-scatter, which sums each chunk's state
gradient over the devices after it (the reverse prefix).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def chunk_index(axis_name: str):
    """This device's chunk number g (traced int32)."""
    return lax.axis_index(axis_name)


def gather_chunks(x, axis_name: str):
    """[G, *x.shape]: every device's `x`, in chunk order (the one collective of the linear mixers' forms)."""
    return lax.all_gather(x, axis_name)


def earlier_chunks(count: int, axis_name: str):
    """[G] bool: chunk j comes before this device's."""
    return jnp.arange(count) < chunk_index(axis_name)


def chunks_between(count: int, axis_name: str):
    """[G, G] float: between[j, r] = 1 where j < r < this device's chunk (the chunks a state from chunk j passes
    through before it reaches this device)."""
    r = jnp.arange(count)
    here = chunk_index(axis_name)
    return ((r[None, :] > r[:, None]) & (r[None, :] < here)).astype(jnp.float32)


def reverse_exclusive_cumsum(x, axis: int):
    """sum_{r > s} x_r along `axis`, summed from the end (no difference of two long sums: no cancellation)."""
    flipped = jnp.flip(x, axis)
    inclusive = jnp.cumsum(flipped, axis=axis)
    exclusive = inclusive - flipped  # subtracts one term, not a long prefix
    return jnp.flip(exclusive, axis)
