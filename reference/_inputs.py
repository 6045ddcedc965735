"""Input handling shared by the three reference forms: default scale, sequence splitting, states."""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (the ground truth); everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sequence_bounds(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch index, start, end) of every independent sequence, in state order."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (sequences packed along T), got q of batch {B}")
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def initial_states(initial_state, N, H, K, M, V, dtype, device):
    """(hk0, hv0) as [N, H, K, M] and [N, H, M, V] in the compute dtype; zeros where absent."""
    hk0 = hv0 = None
    if initial_state is not None:
        hk0, hv0 = initial_state
    hk0 = torch.zeros(N, H, K, M, dtype=dtype, device=device) if hk0 is None else hk0.to(dtype)
    hv0 = torch.zeros(N, H, M, V, dtype=dtype, device=device) if hv0 is None else hv0.to(dtype)
    return hk0, hv0
