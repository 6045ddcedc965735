"""ShortConvolution: the causal depthwise convolution FLA's layers may apply to q, k and v, with its
decode cache.

    y_t = act( sum_{j < W} w[:, j] * x_{t - W + 1 + j} + bias )        per channel, W = kernel_size

Inputs before a sequence's first token are read from the cache (the W most recent inputs of the
previous call, oldest first: cache[..., -1] is the newest, as FLA's) or are zeros without one; packed
sequences (cu_seqlens) never see each other's tokens. The weight is an nn.Conv1d's depthwise
[D, 1, W], so FLA checkpoints load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gsa_kernels.torch_common import token_sequences


class ShortConvolution(nn.Conv1d):
    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu"):
        if activation not in ("silu", "swish", None):
            raise ValueError(f"activation must be 'silu' (or 'swish') or None, got {activation!r}")
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=0, bias=bias)
        self.hidden_size, self.activation = hidden_size, activation

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, output_final_state: bool = False,
                cu_seqlens: torch.Tensor | None = None):
        """(y [B, T, D], the new cache [N, D, W] or None). x [B, T, D]; cache [N, D, W] (N = B, or the
        number of packed sequences with cu_seqlens, B = 1), read only."""
        B, T, D = x.shape
        W = self.kernel_size[0]
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        if cache is not None and tuple(cache.shape) != (N, D, W):
            raise ValueError(f"conv cache (shape {tuple(cache.shape)}) must be [N, D, W] = {(N, D, W)}")
        if cu_seqlens is None:
            past = x.new_zeros(B, W, D) if cache is None else cache.transpose(1, 2).to(x.dtype)   # [B, W, D]
            full = torch.cat([past, x], 1)
            windows = full[:, 1:].unfold(1, W, 1)                           # [B, T, D, W]
            new_cache = full[:, -W:].transpose(1, 2)
        else:
            windows, new_cache = self._packed_windows(x[0], cache, cu_seqlens.to(device=x.device, dtype=torch.long))
            windows = windows[None]
        y = (windows * self.weight[:, 0, :].to(x.dtype)).sum(-1)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        if self.activation is not None:
            y = F.silu(y)
        if not output_final_state:
            return y, None
        return y, new_cache.contiguous()

    def _packed_windows(self, x, cache, cu):
        """Windows [T, D, W] of packed tokens x [T, D] and each sequence's new cache [N, D, W]: position
        p of token t's window is token t - W + 1 + p if that is in t's sequence, else the sequence's
        cache entry that many steps before its start (0 without a cache)."""
        T, D = x.shape
        W = self.kernel_size[0]
        N = cu.numel() - 1
        past = None if cache is None else cache.to(x.dtype).transpose(1, 2)  # [N, W, D], newest last
        steps = torch.arange(W, device=x.device)

        def gather(pos, n):
            """The inputs at packed positions pos [..., W] of sequences n [..., W]: [..., W, D]."""
            start = cu[n]
            inside = pos >= start
            from_x = x[pos.clamp(min=0, max=T - 1)] if T else x.new_zeros(*pos.shape, D)
            if past is None:
                return torch.where(inside[..., None], from_x, 0)
            back = (start - pos).clamp(min=1, max=W)                         # 1: the newest cached input
            return torch.where(inside[..., None], from_x, past[n, W - back])

        t = torch.arange(T, device=x.device)
        seq = token_sequences(cu, T)
        windows = gather(t[:, None] - (W - 1) + steps, seq[:, None].expand(T, W)).transpose(1, 2)
        ends = cu[1:, None] - W + steps                                       # each sequence's last W
        new_cache = gather(ends, torch.arange(N, device=x.device)[:, None].expand(N, W)).transpose(1, 2)
        return windows, new_cache
