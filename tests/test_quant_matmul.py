"""The quantized matmul op: its XLA form and its Pallas kernel (CPU interpreter, both kernel bodies' layouts) equal
the dequantized matmul on fresh random inputs, at shapes that are not multiples of the blocks or of the group."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant_matmul import dequantize_rows, quant_matmul, quantize_rows
from pallas_kernels.quant_matmul import ops as qops

SHAPES = [(5, 200, 70, 64), (40, 256, 130, 128), (1, 96, 16, 32)]  # tokens, inputs, outputs, group size


def _weights(rng, i, o, g, bits):
    codes_OI, scales_Og = quantize_rows(jnp.asarray(rng.standard_normal((o, i)), jnp.float32), bits, g)
    return codes_OI.T.astype(jnp.int8), scales_Og.T


def _numpy_matmul(x, codes_IO, scales_gO, g, act_bits):
    """float64 NumPy: x quantized per token and group, times the dequantized weight."""
    xc, xs = (np.asarray(a) for a in quantize_rows(jnp.asarray(x), act_bits, g))
    w = np.asarray(codes_IO, np.float64) * np.repeat(np.asarray(scales_gO, np.float64), g, axis=0)[:codes_IO.shape[0]]
    return (xc * np.repeat(xs.astype(np.float64), g, axis=1)[:, :x.shape[1]]) @ w


@pytest.mark.parametrize("n,i,o,g,w_bits,act_bits", [(*s, 6, 8) for s in SHAPES] + [(*SHAPES[0], 8, 8),
                                                                                   (*SHAPES[2], 6, 6)])
def test_xla_and_kernel_equal_the_dequantized_matmul(n, i, o, g, w_bits, act_bits):
    rng = np.random.default_rng(n * 1000 + i + w_bits + act_bits)
    x = jnp.asarray(rng.standard_normal((n, i)) * rng.uniform(0.1, 3, (n, 1)), jnp.float32)
    codes, scales = _weights(rng, i, o, g, w_bits)
    want = _numpy_matmul(x, codes, scales, g, act_bits)
    tol = 1e-5 * np.abs(want).max()
    for impl in ("reference", "xla", "pallas"):
        got = np.asarray(quant_matmul(x, codes, scales, group_size=g, act_bits=act_bits, impl=impl))
        assert got.shape == (n, o) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=impl)


@pytest.mark.parametrize("i,g,steps", [(256, 128, 1), (180, 16, 2), (176, 16, 11)])
def test_tpu_layout_in_the_interpreter(i, g, steps):
    """The TPU body's blocks (128-row tokens, 128-lane outputs) through the same kernel, interpreted, with the output
    tile summed over `steps` sequential grid steps of up to 8 groups (12 groups: 2 x 6, 11: 11 x 1; 180: ragged)."""
    assert -(-i // g) // qops._groups_per_step(-(-i // g), "tpu") == steps
    rng = np.random.default_rng(i)
    x = jnp.asarray(rng.standard_normal((33, i)), jnp.float32)
    codes, scales = _weights(rng, i, 200, g, 6)
    got = qops._pallas(x, codes, scales, g, 8, "tpu", interpret=True)
    want = _numpy_matmul(x, codes, scales, g, 8)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("i,o,g", [(200, 130, 64), (256, 256, 128)])
def test_serving_layout_gives_the_same_product_without_padding_per_call(i, o, g):
    """Codes padded once (zero rows to whole groups, zero columns to 128): every impl returns the same product in its
    first O columns and zeros after; the kernel's operands are then a reshape of the codes, no pad of W."""
    rng = np.random.default_rng(i + o)
    x = jnp.asarray(rng.standard_normal((9, i)), jnp.float32)
    codes, scales = _weights(rng, i, o, g, 6)
    served_codes, served_scales = qops.serving_layout(np.asarray(codes, np.int8), np.asarray(scales), g)
    assert (served_codes.shape, served_scales.shape) == qops.serving_shapes(i, o, g)
    want = _numpy_matmul(x, codes, scales, g, 8)
    for impl in ("reference", "xla", "pallas"):
        got = np.asarray(quant_matmul(x, served_codes, served_scales, group_size=g, act_bits=8, impl=impl))
        np.testing.assert_allclose(got[:, :o], want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=impl)
        assert not got[:, o:].any(), impl
    jaxpr = str(jax.make_jaxpr(lambda c: qops._pallas(x, c, jnp.asarray(served_scales), g, 8, "triton",
                                                      interpret=True))(jnp.asarray(served_codes)))
    padded_int8 = [math.prod(map(int, m.group(1).split(","))) for m in re.finditer(r"i8\[([\d,]+)\] = pad\[", jaxpr)]
    assert padded_int8 and max(padded_int8) < served_codes.size, padded_int8  # x's codes only, never W's


def test_quantizer_round_trips_codes():
    v = jnp.asarray(np.random.default_rng(1).standard_normal((3, 130)), jnp.float32)
    codes, scales = quantize_rows(v, 8, 64)
    again, scales2 = quantize_rows(dequantize_rows(codes, scales, 64), 8, 64)
    assert np.array_equal(np.asarray(codes), np.asarray(again))


def test_bad_arguments_are_one_line():
    x, w, s = jnp.zeros((2, 64)), jnp.zeros((64, 8), jnp.int8), jnp.ones((1, 8))
    with pytest.raises(ValueError, match="power of two"):
        quant_matmul(jnp.zeros((2, 48)), jnp.zeros((48, 8), jnp.int8), jnp.ones((1, 8)), group_size=48, impl="pallas")
    with pytest.raises(ValueError, match="w_scales"):
        quant_matmul(x, w, jnp.ones((2, 8)), group_size=64)
    assert jax.jit(lambda a, b, c: quant_matmul(a, b, c, group_size=64)).trace(x, w, s).lower() is not None
