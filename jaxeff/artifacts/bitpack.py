"""Signed integer codes of b bits packed densely into bytes (b = 4, 6 or 8), in the codes' row-major order.

    8 bits: int8, one code per byte
    6 bits: four codes in three bytes: u_j = code_j + 32 in 0..63, the 24-bit word u_0 | u_1 << 6 | u_2 << 12 |
            u_3 << 18 stored little-endian (byte 0 holds its low 8 bits)
    4 bits: two codes per byte: u_j = code_j + 8 in 0..15, u_0 in the low nibble
Padding codes (to a multiple of 4 or 2) are 0. Packing runs in NumPy at export time; unpacking in jnp on the device
the bytes were restored to.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

BITS = (4, 6, 8)
PACKING = {8: "int8, one code per byte",
           6: "4 codes in 3 bytes: u = code + 32, word u0 | u1<<6 | u2<<12 | u3<<18, bytes little-endian",
           4: "2 codes per byte: u = code + 8, first code in the low nibble"}


def packed_size(n: int, bits: int) -> int:
    return {8: n, 6: 3 * -(-n // 4), 4: -(-n // 2)}[bits]


def pack(codes, bits: int) -> np.ndarray:
    """Integer codes in [-2^(b-1), 2^(b-1) - 1] (any shape) -> bytes [packed_size(n, bits)] (int8 for 8 bits)."""
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if flat.size and (flat.min() < lo or flat.max() > hi):
        raise ValueError(f"pack: codes outside [{lo}, {hi}] for {bits} bits")
    if bits == 8:
        return flat.astype(np.int8)
    u = (flat - lo).astype(np.uint32)
    if bits == 4:
        u = np.pad(u, (0, -len(u) % 2)).reshape(-1, 2)
        return (u[:, 0] | u[:, 1] << 4).astype(np.uint8)
    u = np.pad(u, (0, -len(u) % 4)).reshape(-1, 4)
    word = u[:, 0] | u[:, 1] << 6 | u[:, 2] << 12 | u[:, 3] << 18
    return np.stack([word & 0xFF, word >> 8 & 0xFF, word >> 16 & 0xFF], axis=1).reshape(-1).astype(np.uint8)


def unpack(packed, bits: int, n: int):
    """bytes -> int32 codes [n] (jnp)."""
    b = jnp.asarray(packed)
    if bits == 8:
        return b[:n].astype(jnp.int32)
    b = b.astype(jnp.int32)
    if bits == 4:
        u = jnp.stack([b & 0xF, b >> 4], axis=1)
        return u.reshape(-1)[:n] - 8
    b3 = b.reshape(-1, 3)
    word = b3[:, 0] | b3[:, 1] << 8 | b3[:, 2] << 16
    u = jnp.stack([word >> s & 0x3F for s in (0, 6, 12, 18)], axis=1)
    return u.reshape(-1)[:n] - 32
