"""Pure-PyTorch forms of Gated Slot Attention: the ground truth for every kernel in gsa_kernels."""
from reference.naive import naive_recurrent_gsa

__all__ = ["naive_recurrent_gsa"]
