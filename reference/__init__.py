"""Pure-PyTorch forms of Gated Slot Attention: the ground truth for every kernel in gsa_kernels.

naive_recurrent_gsa  the step-by-step recurrence (the definition; slow, any length)
quadratic_gsa        the masked O(T^2 M) form (no loop over time; short sequences)
chunk_gsa_torch      the chunkwise two-pass algorithm in batched matmuls (fast, torch.compile-able)
"""
from reference.chunked import chunk_gsa_torch
from reference.naive import naive_recurrent_gsa
from reference.quadratic import quadratic_gsa

__all__ = ["naive_recurrent_gsa", "quadratic_gsa", "chunk_gsa_torch"]
