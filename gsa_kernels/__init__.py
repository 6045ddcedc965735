"""gsa-kernels: Gated Slot Attention as Triton kernels, a drop-in for flash-linear-attention's fla.ops.gsa."""
from gsa_kernels.chunk import chunk_gsa
from gsa_kernels.fused_recurrent import fused_recurrent_gsa
from gsa_kernels.launches import clear_launches, last_launches

__all__ = ["chunk_gsa", "fused_recurrent_gsa", "last_launches", "clear_launches"]
