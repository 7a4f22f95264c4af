"""InfLLM v2 trainable sparse attention (MiniCPM4): the block selection from pooled keys, a dense-mask reference, a
query-block-chunked XLA form, and block-sparse Pallas kernels over blocks chosen at run time. See ops.py."""

from .ops import IMPLS, infllm_attention, selection
from .reference import block_scores, select_blocks, token_mask

__all__ = ["IMPLS", "block_scores", "infllm_attention", "select_blocks", "selection", "token_mask"]
