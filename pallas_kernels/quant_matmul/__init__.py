"""Quantized matmul for serving (FlexQ-style W6A8 / W8A8 / W6A6): y = Q_a(x) @ Q_w(W), forward only.

`quant_matmul(x, w_codes, w_scales, group_size=, act_bits=, impl=)` is the op (impl = "auto" | "reference" |
"xla" | "pallas"); `quantize_rows` / `dequantize_rows` are the symmetric per-group quantizer it (and jaxeff's
`jaxeff quantize`) uses. See ops.py for the contract, reference.py for the jnp forms, kernel.py for the Pallas
kernel.
"""

from .ops import IMPLS, quant_matmul, serving_layout, serving_shapes
from .reference import dequantize_rows, qmax, quantize_rows

__all__ = ["IMPLS", "dequantize_rows", "qmax", "quant_matmul", "quantize_rows", "serving_layout", "serving_shapes"]
