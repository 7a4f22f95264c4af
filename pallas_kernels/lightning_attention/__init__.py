"""Lightning attention (TransNormerLLM / Lightning Attention-2): decayed causal linear attention.

`lightning_attention(q, k, v, rate, ...)` is the op (impl = "auto" | "reference" | "chunked" | "pallas");
`lightning_attention_step` is its one-token recurrent form for decoding. See ops.py for the contract,
reference.py for the jnp forms and kernel.py for the Pallas forward/backward kernels.
"""

from .ops import IMPLS, lightning_attention, lightning_attention_step

__all__ = ["IMPLS", "lightning_attention", "lightning_attention_step"]
