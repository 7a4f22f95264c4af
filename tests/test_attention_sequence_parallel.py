"""The softmax-attention mixers' sequence-parallel forms (all-gather K and V) equal the whole-sequence op, forward and
gradients, on simulated CPU devices: 96 tokens in chunks of 12 or 24 (not a multiple of the S2 blocks, 8 or 16, so
chunks start mid-block), grouped-query heads (4 query, 2 KV), S2 with vertical stride and with a dense head, sink +
window, and plain causal attention with the heads also split over "tensor"."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import grads_of, split_over_devices
from jaxeff.layers.attention import causal_attention, sharded_causal_attention
from pallas_kernels.s2_attention import expand_to_tokens, pattern, s2_attention
from pallas_kernels.s2_attention.sequence_parallel import chunk_token_mask, sharded_s2_attention

MESHES = {"sequence8": {"sequence": 8}, "data2_sequence4": {"data": 2, "sequence": 4}}
TOL = dict(rtol=1e-5, atol=1e-5)


def split(sharded_fn, spec, axes: dict):
    """The sharded op on whole arrays: every operand and the output split by `spec`."""
    return lambda *args: split_over_devices(sharded_fn, args, (spec,) * len(args), spec, axes)


def inputs(seed=0, b=2, s=96, h=4, g=2, d=8):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, g, d)), jnp.float32) for _ in range(2))
    cotangent = jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32)
    return (q, k, v), cotangent


def check_equal(split, whole, args, cotangent):
    np.testing.assert_allclose(jax.jit(split)(*args), jax.jit(whole)(*args), **TOL)
    for name, got, want in zip("qkv", grads_of(split, args, cotangent), grads_of(whole, args, cotangent)):
        np.testing.assert_allclose(got, want, **TOL, err_msg=f"d{name}")


def row_spec(axes: dict, heads=None):
    return P("data" if "data" in axes else None, "sequence", heads)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_causal_attention_equals_whole_sequence(mesh):
    axes = MESHES[mesh]
    args, cot = inputs()
    spec = row_spec(axes)
    check_equal(split(sharded_causal_attention, spec, axes), causal_attention, args, cot)


def test_sharded_causal_attention_with_heads_over_tensor():
    # data 2 x sequence 2 x tensor 2: query heads {0, 1} | {2, 3} and KV heads {0} | {1} per device, as the
    # layer's ("heads", "kv_heads") -> "tensor" rules place them; query head h must read KV head h // 2
    axes = {"data": 2, "sequence": 2, "tensor": 2}
    args, cot = inputs(seed=1)
    spec = row_spec(axes, "tensor")
    check_equal(split(sharded_causal_attention, spec, axes), causal_attention, args, cot)


S2_PATTERNS = {
    "s2_stride3_bs8": dict(block_size=8, local_blocks=2, vert_stride=3),
    "s2_stride4_offset_bs16": dict(block_size=16, local_blocks=1, vert_stride=4, head_sliding_step=1, head_offset=1),
    "s2_dense_head_bs8": dict(block_size=8, local_blocks=1, vert_stride=4, num_dense_heads=1),
    "sink_window_bs8": dict(block_size=8, local_blocks=2, vert_stride=None, sink_blocks=1),
    "sink_window_bs16": dict(block_size=16, local_blocks=1, vert_stride=None, sink_blocks=1),
}


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("name", list(S2_PATTERNS))
def test_sharded_s2_attention_equals_whole_sequence(name, mesh):
    axes, kw = MESHES[mesh], S2_PATTERNS[name]
    args, cot = inputs(seed=2)
    spec = row_spec(axes)  # every head on each device: the pattern depends on the KV head's index
    whole = functools.partial(s2_attention, impl="xla", **kw)
    check_equal(split(functools.partial(sharded_s2_attention, **kw), spec, axes), whole, args, cot)


@pytest.mark.parametrize("name", ["s2_stride3_bs8", "sink_window_bs16"])
def test_chunk_token_mask_is_the_whole_masks_rows(name):
    kw = dict(S2_PATTERNS[name])
    block_size, s, length = kw.pop("block_size"), 96, 12
    mask_GIJ = pattern((1, s, 4, 8), 2, block_size=block_size, **kw)
    whole_GST = expand_to_tokens(mask_GIJ, s, block_size)
    for g in range(s // length):
        got = chunk_token_mask(mask_GIJ, g * length + jnp.arange(length), s, block_size)
        np.testing.assert_array_equal(got, whole_GST[:, g * length:(g + 1) * length], err_msg=f"chunk {g}")
