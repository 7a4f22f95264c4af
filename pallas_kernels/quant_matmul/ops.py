"""Public quantized matmul op: checks, operand layouts and impl dispatch (forward only: serving)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..common import next_pow2, on_platform
from . import kernel as _kernel
from . import reference as _ref

IMPLS = ("auto", "reference", "xla", "pallas")


def _check(x, w_codes, w_scales, group_size, act_bits, impl):
    if impl not in IMPLS:
        raise ValueError(f"quant_matmul: unknown impl={impl!r}; expected one of {IMPLS}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"quant_matmul: group_size must be a positive int, got {group_size!r}")
    if act_bits not in (4, 6, 8):
        raise ValueError(f"quant_matmul: act_bits must be 4, 6 or 8, got {act_bits!r}")
    n_groups = -(-x.shape[1] // group_size) if x.ndim == 2 else 0
    if x.ndim != 2 or w_codes.ndim != 2 or w_codes.shape[0] not in (x.shape[1], n_groups * group_size):
        raise ValueError(f"quant_matmul: x {tuple(x.shape)} and w_codes {tuple(w_codes.shape)} must be [N, I] and "
                         "[I, O] (or [ceil(I / G) G, O]: the serving layout)")
    if w_scales.shape != (n_groups, w_codes.shape[1]):
        raise ValueError(f"quant_matmul: w_scales has shape {tuple(w_scales.shape)}, expected [ceil(I / G), O] = "
                         f"{(n_groups, w_codes.shape[1])}")


SERVING_LANES = 128  # outputs of a serving layout are padded to this: GPU (64) and TPU (128) blocks divide it


def serving_shapes(i: int, o: int, group_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of (w_codes, w_scales) in the serving layout of a weight [I, O]."""
    n_groups, o_padded = -(-i // group_size), -(-o // SERVING_LANES) * SERVING_LANES
    return (n_groups * group_size, o_padded), (n_groups, o_padded)


def serving_layout(w_codes_IO, w_scales_gO, group_size: int):
    """Codes and scales padded once, when a model is loaded, with zero rows to whole groups and zero columns to a
    multiple of SERVING_LANES: each call then views the codes group-major with a reshape instead of padding (a copy
    of W per matmul, per decoded token). quant_matmul on this layout returns the padded columns too (zeros): slice
    them off. On the host (NumPy), once."""
    (rows, cols), _ = serving_shapes(*w_codes_IO.shape, group_size)
    codes = np.pad(np.asarray(w_codes_IO), ((0, rows - w_codes_IO.shape[0]), (0, cols - w_codes_IO.shape[1])))
    return codes, np.pad(np.asarray(w_scales_gO), ((0, 0), (0, cols - w_scales_gO.shape[1])))


def kernel_fits(group_size: int) -> bool:
    """The kernel tiles a group as one dot operand: a power of two >= 16 (Triton's tl.dot)."""
    return group_size >= 16 and group_size & (group_size - 1) == 0


def _blocks(n: int, platform: str) -> tuple[int, int]:
    # int8 rows tile by 32 on TPU, and Triton wants powers of two; outputs by 128 lanes (TPU) or 64 (a float32
    # accumulator of 64 x 64 per 4 warps on GPU keeps its registers)
    block_n = max(32, min(128 if platform == "tpu" else 64, next_pow2(n)))
    return block_n, 128 if platform == "tpu" else 64


def _groups_per_step(n_groups: int, platform: str) -> int | None:
    """TPU: the largest divisor of nG up to 8 (VMEM holds that many groups' blocks); GPU: all (None)."""
    return max(k for k in range(1, 9) if n_groups % k == 0) if platform == "tpu" else None


def _pallas(x_NI, w_codes_IO, w_scales_gO, group_size, act_bits, platform, interpret=False):
    n, o = x_NI.shape[0], w_codes_IO.shape[1]
    block_n, block_o = _blocks(n, platform)
    np_, op = -(-n // block_n) * block_n, -(-o // block_o) * block_o
    xc_NgG, xs_Ng, wc_gGO = _ref.grouped_codes(x_NI, w_codes_IO, group_size, act_bits)
    xc_gNG = jnp.pad(xc_NgG, ((0, np_ - n), (0, 0), (0, 0))).transpose(1, 0, 2)
    xs_gN1 = jnp.pad(xs_Ng, ((0, np_ - n), (0, 0))).T[:, :, None]
    if op > o:  # a copy of W on every call: loaders avoid it with `serving_layout`
        wc_gGO = jnp.pad(wc_gGO, ((0, 0), (0, 0), (0, op - o)))
    ws_g1O = jnp.pad(w_scales_gO.astype(jnp.float32), ((0, 0), (0, op - o)))[:, None, :]
    out = _kernel.quant_matmul_kernel(xc_gNG, xs_gN1, wc_gGO, ws_g1O, block_n=block_n, block_o=block_o,
                                      platform=platform, interpret=interpret,
                                      groups_per_step=_groups_per_step(w_scales_gO.shape[0], platform))
    return out[:n, :o]


def quant_matmul(x, w_codes, w_scales, *, group_size: int = 128, act_bits: int = 8, impl: str = "auto"):
    """y [N, O] float32 = Q_a(x) @ (w_codes x w_scales): x [N, I] float, quantized per row (token) and per group of
    `group_size` inputs to `act_bits`; w_codes [I, O] integer codes (in [-128, 127]), w_scales [ceil(I / G), O].
    w_codes may also be [ceil(I / G) G, O] with zero rows past I (`serving_layout`: no copy of W per call).

    impl: "reference" (dequantize both, float32 matmul), "xla" (int8 codes, int32 accumulation per group, then the
    scales), "pallas" (the kernel; the interpreter on CPU; group_size a power of two >= 16), "auto" (Pallas on
    GPU/TPU, xla on CPU, chosen when lowering; xla wherever the group size does not suit the kernel)."""
    _check(x, w_codes, w_scales, group_size, act_bits, impl)
    args = (x, w_codes, w_scales, group_size, act_bits)
    if impl == "reference":
        return _ref.dequantized_matmul(*args)
    if impl == "xla" or (impl == "auto" and not kernel_fits(group_size)):
        return _ref.xla_matmul(*args)
    if not kernel_fits(group_size):
        raise ValueError(f"quant_matmul: impl='pallas' needs a group_size that is a power of two >= 16, got "
                         f"{group_size}; use impl='xla'")
    cpu = (lambda: _pallas(*args, "triton", interpret=True)) if impl == "pallas" else (lambda: _ref.xla_matmul(*args))
    return on_platform((), kernel=lambda body: lambda: _pallas(*args, body), cpu=cpu)
