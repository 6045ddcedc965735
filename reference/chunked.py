"""The chunkwise form of Gated Slot Attention in plain PyTorch, as the library ships it.

It lives in gsa_kernels/torch_chunked.py, because chunk_gsa dispatches to its compiled form where a
tuned entry chose the torch.compile backend, and the library must not depend on reference/. It is
re-exported here beside the naive recurrence and the quadratic form, which tests/test_reference.py
checks it against.
"""
from gsa_kernels.torch_chunked import chunk_gsa_torch

__all__ = ["chunk_gsa_torch"]
