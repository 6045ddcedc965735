"""gsa-kernels: Gated Slot Attention as Triton kernels, a drop-in for flash-linear-attention's fla.ops.gsa."""
from gsa_kernels.chunk import chunk_gsa
from gsa_kernels.configs import last_configs
from gsa_kernels.recurrent import fused_recurrent_gsa
from gsa_kernels.tuned import last_launches
from gsa_kernels import ops  # noqa: E402,F401  (registers the torch.library custom ops that torch.compile uses)

__all__ = ["chunk_gsa", "fused_recurrent_gsa", "last_configs", "last_launches"]
