"""S2-Attention (heterogeneous strided block-sparse attention): the block pattern, a dense-mask reference, a
gather form that reads only kept KV blocks, and block-sparse Pallas flash-attention kernels. See ops.py."""

from .ops import IMPLS, pattern, s2_attention
from .reference import block_mask, check_coverage, expand_to_tokens, kept_kv_blocks, merge_partitions

__all__ = ["IMPLS", "block_mask", "check_coverage", "expand_to_tokens", "kept_kv_blocks", "merge_partitions", "pattern",
           "s2_attention"]
