"""Pieces shared by the pure-PyTorch forms of GSA (this package's chunked form, torch_chunked.py, and
the reference forms of reference/): input validation, the compute dtype, sequence bounds, initial
states and masked exponentials.

Errors name the argument, what it is and what was expected, so that a wrong call fails here and
not deep inside an einsum.
"""
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


def reverse_time(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, ...] with each sequence's tokens in reverse order: dim 1 flipped, or with cu_seqlens
    (packed sequences, B = 1) each sequence flipped in place, by an index built on the device (no host
    sync). Its own inverse; differentiable."""
    if cu_seqlens is None:
        return x.flip(1)
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    t = torch.arange(x.shape[1], device=x.device)
    n = token_sequences(cu, x.shape[1])
    return x.index_select(1, cu[n] + cu[n + 1] - 1 - t)


def token_sequences(cu: torch.Tensor, T: int) -> torch.Tensor:
    """The sequence of each of T packed tokens, [T] int64, from the offsets cu [N + 1] (on the device,
    no host sync)."""
    t = torch.arange(T, device=cu.device)
    return torch.searchsorted(cu[1:], t, right=True).clamp(max=cu.numel() - 2)


def initial_states(initial_state, N, H, K, M, V, dtype, device):
    """(hk0, hv0) as [N, H, K, M] and [N, H, M, V] in the compute dtype; zeros where absent."""
    hk0 = hv0 = None
    if initial_state is not None:
        hk0, hv0 = initial_state
    hk0 = torch.zeros(N, H, K, M, dtype=dtype, device=device) if hk0 is None else hk0.to(dtype)
    hv0 = torch.zeros(N, H, M, V, dtype=dtype, device=device) if hv0 is None else hv0.to(dtype)
    return hk0, hv0


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    return f"a {type(x).__name__}"


def check_inputs(q, k, v, s, g, initial_state, cu_seqlens) -> int:
    """Raise TypeError/ValueError on malformed inputs; return N, the number of sequences."""
    named = dict(q=q, k=k, v=v, s=s, g=g)
    if g is None:   # ABC mode: the gates come from s
        del named["g"]
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {_describe(x)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_describe(x)}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, *], got {_describe(x)}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {_describe(x)}")
    B, T, H, K = q.shape
    V, M = v.shape[-1], s.shape[-1]
    expected = dict(k=(B, T, H, K), v=(B, T, H, V), s=(B, T, H, M), g=(B, T, H, M))
    for name, shape in expected.items():
        if name not in named:
            continue
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (from q [B, T, H, K] = {tuple(q.shape)}, "
                             f"v [.., V] and s [.., M]), got {_describe(named[name])}")

    N = B
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 \
                or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor of N+1 >= 2 offsets, "
                             f"got {_describe(cu_seqlens)}")
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (sequences packed along T), got q {_describe(q)}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != T or any(a > b for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must start at 0, never decrease and end at T={T}, got {cu}")
        N = len(cu) - 1

    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise TypeError(f"initial_state must be a pair (hk0, hv0), got {_describe(initial_state)}")
        for name, x, shape in (("hk0", initial_state[0], (N, H, K, M)), ("hv0", initial_state[1], (N, H, M, V))):
            if x is None:
                continue
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"initial_state {name} must be a floating-point tensor, got {_describe(x)}")
            if tuple(x.shape) != shape:
                raise ValueError(f"initial_state {name} must have shape {shape} ([N, H, ...] with N = "
                                 f"{'len(cu_seqlens) - 1' if cu_seqlens is not None else 'B'}), got {_describe(x)}")
            if x.device != q.device:
                raise ValueError(f"initial_state {name} must be on q's device {q.device}, got {_describe(x)}")
    return N


def masked_exp(diff: torch.Tensor, keep: torch.Tensor | None = None, unit: torch.Tensor | None = None):
    """exp(diff) with masks applied to the exponent: exactly 0 where not `keep`, exactly 1 where `unit`.

    keep: the dropped exponents (G_i - G_j for j > i) can be huge and positive; masking after exp
        would give inf in the forward pass and NaN (0 * inf) in the backward pass.
    unit: marks the differences G_i - G_i. As a constant 1 they send no gradient to g; through
        autograd each would add +x and -x to dg_i, which cancel only up to rounding: an error with
        no true counterpart in dg, large next to dg entries that are tiny (alpha near 0).
    """
    if keep is not None:
        diff = diff.masked_fill(~keep, float("-inf"))
    if unit is not None:
        diff = diff.masked_fill(unit, 0.0)
    return diff.exp()


def run_per_sequence(core, q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens, *core_args):
    """The contract shared by the PyTorch forms around their `core(q, k, v, s, g, scale, hk0, hv0,
    *core_args) -> (o, hk, hv)`: input checks, the compute dtype, the default scale and initial states,
    and packed sequences run as one batch of one each. Returns o in q's dtype and the final states
    in the compute dtype, or (None, None) without output_final_state. g None: ABC mode, its gates
    from s by gsa_kernels/abc_gates.py."""
    N = check_inputs(q, k, v, s, g, initial_state, cu_seqlens)
    if g is None:
        from gsa_kernels.abc_gates import abc_gates
        s, g = abc_gates(s, cu_seqlens)
    B, T, H, K = q.shape
    V, M = v.shape[-1], s.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt, out_dtype = compute_dtype(q), q.dtype
    q, k, v, s, g = (x.to(dt) for x in (q, k, v, s, g))
    hk0, hv0 = initial_states(initial_state, N, H, K, M, V, dt, q.device)
    if cu_seqlens is None:
        o, hk, hv = core(q, k, v, s, g, scale, hk0, hv0, *core_args)
    else:
        # sequences differ in length: one batch of one per sequence
        parts = [core(*(x[:, start:end] for x in (q, k, v, s, g)), scale, hk0[n:n + 1], hv0[n:n + 1],
                      *core_args)
                 for n, (_, start, end) in enumerate(sequence_bounds(B, T, cu_seqlens))]
        o = torch.cat([part[0] for part in parts], 1)
        hk = torch.cat([part[1] for part in parts], 0)
        hv = torch.cat([part[2] for part in parts], 0)
    return o.to(out_dtype), ((hk, hv) if output_final_state else (None, None))
