"""The masked quadratic form of Gated Slot Attention (docs/contract.md, "Math"): all time steps at once.

Every output step sees every earlier step through a [T, T, M] tensor of decays, so it costs
O(T^2 M) memory and serves short sequences. It has no loop over time, which makes it an
independent check of the recurrence and of the chunked algorithm.
"""
from __future__ import annotations

import torch

from gsa_kernels.torch_common import masked_exp, run_per_sequence


def causal_decay(gc: torch.Tensor) -> torch.Tensor:
    """exp(Gc_t - Gc_j) for j <= t, exactly 0 above the diagonal: [B, H, T, T, M] from gc [B, H, T, M].

    The difference is masked before exp, so the positive exponents above the diagonal (which
    overflow for very negative gates) never reach exp, in the forward or the backward pass.
    """
    T = gc.shape[2]
    diff = gc[:, :, :, None, :] - gc[:, :, None, :, :]                   # [B, H, t, j, M]
    causal = torch.ones(T, T, dtype=torch.bool, device=gc.device).tril()
    diagonal = torch.eye(T, dtype=torch.bool, device=gc.device)
    return masked_exp(diff, keep=causal[:, :, None], unit=diagonal[:, :, None])


def _quadratic_core(q, k, v, s, g, scale, hk0, hv0):
    """o [B, T, H, V], hk [B, H, K, M], hv [B, H, M, V] for B independent sequences of one length."""
    q, k, v, s, g = (x.transpose(1, 2) for x in (q, k, v, s, g))       # [B, H, T, *]
    gc = g.cumsum(2)                                                     # Gc_t, log decay since t=0
    # w[t, j, m] = s_j[m] exp(Gc_t - Gc_j): how much of step j's slot write survives at step t
    w = s[:, :, None, :, :] * causal_decay(gc)                          # [B, H, t, j, M]

    # keys side: scores over slots, then the slot softmax
    qk = q @ k.transpose(-1, -2)                                         # [B, H, t, j]
    scores = torch.einsum("bhtj,bhtjm->bhtm", qk, w) + (q @ hk0) * gc.exp()
    p = (scale * scores).softmax(-1)

    # values side: read the value memory with the slot weights p
    av = torch.einsum("bhtm,bhtjm->bhtj", p, w)                          # [B, H, t, j]
    o = av @ v + (p * gc.exp()) @ hv0

    # final states: every write decayed to the last step (exponents <= 0 there, no mask needed)
    if q.shape[2] == 0:
        return o.transpose(1, 2), hk0, hv0
    T = q.shape[2]
    last = torch.arange(T, device=q.device)[:, None] == T - 1           # Gc_T - Gc_T: exactly 0
    tail = s * masked_exp(gc[:, :, -1:, :] - gc, unit=last)              # [B, H, T, M]
    hk = hk0 * gc[:, :, -1, None, :].exp() + k.transpose(-1, -2) @ tail
    hv = hv0 * gc[:, :, -1, :, None].exp() + tail.transpose(-1, -2) @ v
    return o.transpose(1, 2), hk, hv


def quadratic_gsa(q, k, v, s, g=None, scale=None, initial_state=None, output_final_state=False,
                  cu_seqlens=None):
    """o, (hk, hv) = GSA by the masked quadratic form; same contract as naive_recurrent_gsa.

    q, k [B, T, H, K]; v [B, T, H, V]; s, g [B, T, H, M] (g None: ABC mode, gates from s by
    gsa_kernels/abc_gates.py). Computed in float64 for float64 inputs,
    float32 otherwise; o is returned in q's dtype, the final states [N, H, K, M] and [N, H, M, V]
    in the compute dtype (or (None, None) without output_final_state).
    """
    return run_per_sequence(_quadratic_core, q, k, v, s, g, scale, initial_state, output_final_state,
                            cu_seqlens)
