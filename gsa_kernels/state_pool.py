"""State pools, as serving engines keep them: one pair of float32 tensors per layer, hk_pool
[S, H, K, M] and hv_pool [S, H, M, V], each request's state in one slot.

A call names each sequence's slot, `state_indices` [N] (integers; -1 marks a padding row: its state
is taken as zeros and nothing is written back), and whether the slot holds a state to continue from,
`has_initial_state` [N] (bool; False starts from zeros, for a new request reusing a slot; None: every
row continues). The new states are written into the same slots. No host sync: values of
indices on the CPU are checked for free (then copied over), those on the GPU only with
GSA_KERNELS_VALIDATE=1; an out-of-range index on the GPU is otherwise undefined behaviour.

The decode step reads and writes the pool in its kernel (kernels/decode.py, POOLED). Other calls
gather the rows' states (`gather`), run the op on them and write the final states back (`scatter`):
one extra copy of the N states each way, which a prefill's work dwarfs.
"""
from __future__ import annotations

import torch

from gsa_kernels.checks import validating
from gsa_kernels.torch_common import token_sequences

_INDEX_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def check_pool(pools, state_indices, has_initial_state, N, H, K, M, V, device):
    """(state_indices, has_initial_state) as [N] int64 and bool tensors on `device`, after checking
    the pools and both (ValueError / TypeError naming the argument)."""
    if not isinstance(pools, (tuple, list)) or len(pools) != 2 or not all(isinstance(p, torch.Tensor) for p in pools):
        raise TypeError("with state_indices, initial_state must be the pools (hk_pool [S, H, K, M], "
                        "hv_pool [S, H, M, V]) of float32 tensors")
    hk_pool, hv_pool = pools
    S = hk_pool.shape[0] if hk_pool.dim() == 4 else -1
    for name, x, shape in (("initial_state[0] (hk_pool)", hk_pool, (S, H, K, M)),
                           ("initial_state[1] (hv_pool)", hv_pool, (S, H, M, V))):
        desc = f"{name} (shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device})"
        if tuple(x.shape) != shape or x.dtype != torch.float32 or x.device != device or not x.is_contiguous():
            raise ValueError(f"{desc}: expected a contiguous float32 pool of shape {shape} on {device}")
    if not isinstance(state_indices, torch.Tensor) or state_indices.dtype not in _INDEX_DTYPES \
            or tuple(state_indices.shape) != (N,):
        got = (f"shape {tuple(state_indices.shape)}, dtype {state_indices.dtype}"
               if isinstance(state_indices, torch.Tensor) else type(state_indices).__name__)
        raise ValueError(f"state_indices ({got}): expected an integer tensor [N = {N}], one slot per sequence")
    if state_indices.device.type == "cpu" or validating():
        lo, hi = (int(x) for x in torch.stack(torch.aminmax(state_indices.long()))) if N else (0, 0)
        if lo < -1 or hi >= S:
            raise ValueError(f"state_indices holds values in [{lo}, {hi}]: each must be a slot in [0, {S}) "
                             f"of the pools, or -1 for a padding row")
    flags = torch.ones(N, dtype=torch.bool, device=device)
    if has_initial_state is not None:
        if not isinstance(has_initial_state, torch.Tensor) or tuple(has_initial_state.shape) != (N,):
            raise ValueError(f"has_initial_state: expected a bool tensor [N = {N}] or None")
        flags = has_initial_state.to(device=device, dtype=torch.bool)
    return state_indices.to(device=device, dtype=torch.int64), flags


def gather(pools, state_indices, has_initial_state):
    """(hk0, hv0) [N, ...]: each row's slot, zeros for a padding row or one without a state."""
    read = (has_initial_state & (state_indices >= 0)).float()
    rows = state_indices.clamp(min=0)
    return tuple(pool.index_select(0, rows) * read.view(-1, 1, 1, 1) for pool in pools)


def scatter(pools, state_indices, new_states):
    """Write each row's new state into its slot, padding rows excepted. Without a host sync a padding
    row cannot be dropped from the index, so it writes what the first real row writes, to that row's
    slot (or, with no real row, slot 0's own state back to it): identical values, so the writes to a
    shared slot agree."""
    valid = state_indices >= 0
    any_valid = valid.any()
    first = valid.to(torch.int8).argmax()
    slot = torch.where(valid, state_indices, torch.where(any_valid, state_indices[first], 0))
    for pool, new in zip(pools, new_states):
        fallback = torch.where(any_valid, new[first], pool[0])
        pool.index_copy_(0, slot, torch.where(valid.view(-1, 1, 1, 1), new, fallback))


def zero_padding_rows(o, state_indices, cu_seqlens):
    """o [B, T, H, V] with the tokens of padding rows (index -1) set to 0, as the decode kernel leaves
    them: row b of the batch, or with cu_seqlens the tokens of sequence n."""
    keep = state_indices >= 0
    if cu_seqlens is None:
        return torch.where(keep.view(-1, 1, 1, 1), o, 0)
    seq = token_sequences(cu_seqlens.to(device=o.device, dtype=torch.long), o.shape[1])
    return torch.where(keep[seq].view(1, -1, 1, 1), o, 0)

