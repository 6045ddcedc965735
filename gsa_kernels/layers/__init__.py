"""Model code from the library: the GSA token mixer, the residual block and a small causal LM."""
from gsa_kernels.layers.block import GSABlock, SwiGLU
from gsa_kernels.layers.cache import GSACache
from gsa_kernels.layers.conv import ShortConvolution
from gsa_kernels.layers.gsa import GatedSlotAttention
from gsa_kernels.layers.model import GSAModel
from gsa_kernels.layers.norms import RMSNorm

__all__ = ["GatedSlotAttention", "GSABlock", "GSACache", "GSAModel", "RMSNorm", "ShortConvolution", "SwiGLU"]
