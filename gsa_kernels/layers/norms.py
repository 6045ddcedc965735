"""RMSNorm (float32 statistics, output in the input's dtype): one fused launch each way on CUDA in
eager mode, plain PyTorch otherwise (layers/fused.py)."""
from __future__ import annotations

import torch
from torch import nn

from gsa_kernels.layers.fused import rms_norm


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dim; statistics in float32."""

    def __init__(self, hidden_size: int, elementwise_affine: bool = True, eps: float = 1e-5):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.weight is not None}"
