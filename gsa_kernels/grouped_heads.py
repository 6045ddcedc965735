"""Grouped query heads (GQA), as flash-linear-attention 0.6.0 takes them: q [B, T, HQ, K] with k, v, s,
g [B, T, H, .] and HQ a multiple of H; initial and final states per kv head, [N, H, ...].

The memories depend only on k, v, s and g, so each kv head has one state, read by its HQ / H query
heads. This first form runs the ops as FLA does: k, v, s, g and the initial states repeated to the
query heads (the memories computed once per query head), the final states taken from the first
query head of each group; gradients sum over a group through the repeat. Walking the states per kv
head inside the kernels (no repeated tensors, 1 / group of the state work) is the next step.
"""
from __future__ import annotations

import torch


def group_size(q, k) -> int:
    """HQ / H of a call (1 without grouping); a ValueError when HQ is not a multiple of H."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or q.dim() != 4 or k.dim() != 4:
        return 1            # the op's own checks name the problem
    HQ, H = q.shape[2], k.shape[2]
    if HQ == H:
        return 1
    if H == 0 or HQ % H:
        raise ValueError(f"q has {HQ} heads and k {H}: grouped query heads need q's head count to be a "
                         f"multiple of k's (and v's, s's and g's)")
    return HQ // H


def expand(x, G: int):
    """[B, T, H, D] -> [B, T, H * G, D], each kv head repeated for its G query heads (None stays None)."""
    return None if x is None else x.repeat_interleave(G, dim=2)


def expand_state(initial_state, G: int):
    """Per-kv-head initial states [N, H, ...] -> per query head [N, H * G, ...]."""
    if initial_state is None:
        return None
    return tuple(None if x is None else x.repeat_interleave(G, dim=1) for x in initial_state)


def reduce_state(state, G: int):
    """Per-query-head final states -> per kv head: the group's first (all G are the same memory)."""
    return tuple(None if x is None else x[:, ::G] for x in state)
