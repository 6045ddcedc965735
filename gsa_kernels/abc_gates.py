"""The gates of ABC mode (`g=None`): slot weights and forget gates from the slot logits alone.

With z_t = log sum_{j <= t} exp(s_j) (per slot, over the tokens of one sequence), the running
log-normaliser, ABC writes each token with the weight exp(s_t - z_t) and forgets with
g_t = z_{t-1} - z_t, so a slot's memory is always the softmax-weighted average over time of what was
written into it. The first token of each sequence has g = 0 (there is no z_{t-1}) and weight 1.
This is flash-linear-attention 0.6.0's `chunk_gsa(..., g=None)` / `fused_recurrent_gsa(..., g=None)`:
its `fused_additive_gate` is called there without an initial normaliser, so the normaliser restarts
at every call, an initial state (hk0, hv0) included, which the first token therefore does not decay.

Plain differentiable torch ops (gradients reach s through both the weights and the gates), in
float32 (float64 stays float64), no loop over time; usable inside torch.compile without cu_seqlens.
"""
from __future__ import annotations

import torch


def _normalised(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log weights s - z, gates g) of sequences along dim 1 of x [B, T, H, M], each from its first token."""
    z = torch.logcumsumexp(x, dim=1)
    z_prev = torch.cat([torch.full_like(z[:, :1], float("-inf")), z[:, :-1]], dim=1)
    # z_prev = -inf: no earlier mass (the first token, or an all -inf prefix): g = 0, as FLA does.
    # z never decreases in the math; clamp so that the rounding of the scan cannot make g > 0 or a
    # weight > 1 (the where / clamp pass the gradient through unchanged inside the domain)
    g = torch.where(torch.isneginf(z_prev), torch.zeros_like(z), (z_prev - z).clamp(max=0))
    return (x - z).clamp(max=0), g


def abc_gates(s: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
              cu_seqlens_cpu: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, g) of ABC mode from the slot logits s [B, T, H, M] (module docstring).

    weights = exp(s_t - z_t) in (0, 1], in s's dtype; g = z_{t-1} - z_t <= 0 in float32 (float64 for
    float64 s), 0 at every sequence's first token. cu_seqlens [N + 1] (with B = 1): each packed
    sequence has its own normaliser; its offsets are read on the host (cu_seqlens_cpu when given,
    else one copy of cu_seqlens), one slice per sequence.
    """
    dt = torch.float64 if s.dtype == torch.float64 else torch.float32
    x = s.to(dt)
    if cu_seqlens is None:
        logw, g = _normalised(x)
    else:
        offsets = (cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens).tolist()
        parts = [_normalised(x[:, a:b]) for a, b in zip(offsets[:-1], offsets[1:]) if b > a]
        if parts:
            logw = torch.cat([p[0] for p in parts], dim=1)
            g = torch.cat([p[1] for p in parts], dim=1)
        else:   # T == 0
            logw, g = x, torch.zeros_like(x)
    return logw.exp().to(s.dtype), g
