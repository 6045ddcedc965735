"""Grouped query heads (GQA), as flash-linear-attention 0.6.0 takes them: q [B, T, HQ, K] with k, v, s,
g [B, T, H, .] and HQ a multiple of H; initial and final states per kv head, [N, H, ...].

The memories depend only on k, v, s and g, so each kv head has one state, read by its HQ / H query
heads. Every kernel walks the states per kv head (launchers/chunk.py, kernels/recurrent.py,
kernels/decode.py). What here repeats the kv heads to the query heads, as FLA does, serves the two
chunk_gsa paths that take one head count: the pure-PyTorch chunked form (the torch_compile backend)
and groups too large for the stacked reverse walk at any chunk size (launchers/chunk.py
`stacked_chunk_limit`). Gradients sum over a group through the repeat.
"""
from __future__ import annotations


def expand(x, G: int):
    """[B, T, H, D] -> [B, T, H * G, D], each kv head repeated for its G query heads (None stays None)."""
    return x if x is None or G == 1 else x.repeat_interleave(G, dim=2)


def expand_state(initial_state, G: int):
    """Per-kv-head initial states [N, H, ...] -> per query head [N, H * G, ...]."""
    if initial_state is None:
        return None
    return tuple(None if x is None else x.repeat_interleave(G, dim=1) for x in initial_state)


def reduce_state(state, G: int):
    """Per-query-head final states -> per kv head: the group's first (all G are the same memory)."""
    return tuple(None if x is None else x[:, ::G] for x in state)


def per_kv_head(result, G: int):
    """(o, final states) of a call on repeated kv heads -> (o, final states per kv head)."""
    o, state = result
    return o, reduce_state(state, G)
