"""Context parallelism: one batch of sequences split along time over the ranks of a process group.

Rank r holds the tokens [t_r, t_r + T_r) of every sequence (ranks in sequence order, T_r >= 1 and free
to differ). GSA's two memories are linear in the memories that enter a span of tokens, through one
decay per slot:

    Hk_end = Hk_start * exp(D)[None, :] + Hk_local        Hk [K, M]
    Hv_end = exp(D)[:, None] * Hv_start + Hv_local        Hv [M, V]

with D the sum of g over the span and (Hk_local, Hv_local) the span's memories from zero. So:

1. each rank computes its summary (Hk_local, Hv_local, D) in one pass over k, v, s, g: with
   w_t = s_t * exp(sum of g after t), Hk_local = sum_t k_t w_t^T and Hv_local = sum_t w_t v_t^T
   (the suffix sums of g in float64, so that a long slice keeps float32's precision in its decays);
2. one all_gather of the summaries (per sequence-head K M + M V + M floats: 0.5 MB at H 4, K = V 512,
   M 64, float32);
3. each rank folds the summaries of the ranks before it into its initial state (the same fold as the
   two-level state walk of one GPU, kernels/fold.py, here over ranks in PyTorch: there are few) and runs
   the op on its slice with it; the whole sequences' final states are the fold over every rank.

The backward runs the fold backwards on the gathered summaries and sums their gradients over the
ranks with one all_reduce; each rank keeps its own summary's gradient and backpropagates it through
step 1. No point-to-point traffic and no host sync besides the two collectives: NCCL on GPUs, gloo on
CPUs, the same code. LASP-2 (Sun et al., 2025) is the published form of this scheme for linear
attention; GSA's slot softmax reads the memories but never feeds them, so it changes nothing here.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from gsa_kernels.chunk import chunk_gsa
from gsa_kernels.torch_common import compute_dtype, initial_states


def chunk_gsa_cp(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False, group=None,
                 op=None, **kwargs):
    """chunk_gsa over a sequence split along time between the ranks of `group` (default: the world).

    q [B, T_r, HQ, K], k [B, T_r, H, K], v [B, T_r, H, V], s, g [B, T_r, H, M]: this rank's slice of the
    same B sequences (ranks in sequence order, T_r >= 1, may differ between ranks and be shorter than a
    chunk). Returns this rank's o [B, T_r, HQ, V] and, with output_final_state, the final states of the
    whole sequences (hk [B, H, K, M], hv [B, H, M, V], float32; float64 for float64 inputs) on every
    rank; else (None, None). initial_state: the whole sequences' initial states, the same on every rank.

    Gradients: every rank must run its backward (each takes part in one all_reduce). The total loss is
    the sum of the ranks' losses: the final states' gradients are summed over the ranks, and
    initial_state's gradient is the whole sequences' on every rank.
    op: the single-device op run on each slice with its folded initial state (default chunk_gsa, with
    `kwargs` such as checkpoint_level or chunk_size); anything with chunk_gsa's call and return, e.g.
    gsa_kernels.torch_chunked.chunk_gsa_torch.
    Not supported: g=None (ABC mode's gates are a running logsumexp over the whole sequence) and
    cu_seqlens (every rank holds the same B sequences).
    """
    if g is None:
        raise ValueError("chunk_gsa_cp: g=None (ABC mode) is not supported: its gates depend on the whole "
                         "sequence's running logsumexp; compute g first and pass it")
    if kwargs.get("cu_seqlens") is not None:
        raise ValueError("chunk_gsa_cp: cu_seqlens is not supported: every rank holds a slice of the same "
                         "B sequences, [B, T_r, H, ...]")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("chunk_gsa_cp needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    if k.dim() != 4 or v.dim() != 4 or s.shape != g.shape or s.dim() != 4:
        raise ValueError(f"chunk_gsa_cp: expected k [B, T, H, K], v [B, T, H, V], s and g [B, T, H, M], got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}, s {tuple(s.shape)}, g {tuple(g.shape)}")
    B, T, H, K = k.shape
    V, M = v.shape[-1], s.shape[-1]
    if T < 1:
        raise ValueError(f"chunk_gsa_cp: every rank needs at least one token, got a slice of T = {T}")
    op = chunk_gsa if op is None else op
    dtype = compute_dtype(k)
    hk0, hv0 = _initial_states(initial_state, B, H, K, M, V, k.device, dtype)
    summary = _summary(k, v, s, g, dtype)
    dims = (B, H, K, M, V)
    hk_in, hv_in, hk_end, hv_end = _Exchange.apply(
        lambda gathered, rank, hk0, hv0: _states_around(gathered, rank, hk0, hv0, dims), group, summary, hk0, hv0)
    o, _ = op(q, k, v, s, g, scale=scale, initial_state=(hk_in, hv_in), output_final_state=False, **kwargs)
    return o, ((hk_end, hv_end) if output_final_state else (None, None))


def _initial_states(initial_state, B, H, K, M, V, device, dtype):
    if initial_state is not None and (tuple(initial_state[0].shape) != (B, H, K, M)
                                      or tuple(initial_state[1].shape) != (B, H, M, V)):
        raise ValueError(f"chunk_gsa_cp: initial_state must be (hk [B, H, K, M], hv [B, H, M, V]) = "
                         f"({[B, H, K, M]}, {[B, H, M, V]}), got ({list(initial_state[0].shape)}, "
                         f"{list(initial_state[1].shape)})")
    return initial_states(initial_state, B, H, K, M, V, dtype, device)


def _summary(k, v, s, g, dtype):
    """This slice's (Hk_local, Hv_local, D), flattened to [B, H, K M + M V + M] in dtype (float32, or
    float64 for float64 inputs); differentiable."""
    # time innermost: PyTorch scans an outer dim serially (23 ms at T = 65536 on an H200)
    g64 = g.double().permute(0, 2, 3, 1).contiguous()                            # [B, H, M, T]
    # the sum of g over the tokens after t, as an exclusive suffix sum (no difference of two sums:
    # a -inf gate would make one NaN)
    after = torch.cat([g64.flip(-1).cumsum(-1).flip(-1)[..., 1:], torch.zeros_like(g64[..., :1])], dim=-1)
    w = s.to(dtype) * torch.exp(after).to(dtype).permute(0, 3, 1, 2)             # [B, T, H, M]
    hk = torch.einsum("bthk,bthm->bhkm", k.to(dtype), w)
    hv = torch.einsum("bthm,bthv->bhmv", w, v.to(dtype))
    D = g64.sum(-1).to(dtype)                                                    # [B, H, M]
    B, H = D.shape[:2]
    return torch.cat([hk.reshape(B, H, -1), hv.reshape(B, H, -1), D], dim=-1)


def _unpack(summary, K, M, V):
    B, H = summary.shape[:2]
    hk = summary[..., :K * M].reshape(B, H, K, M)
    hv = summary[..., K * M:K * M + M * V].reshape(B, H, M, V)
    return hk, hv, summary[..., K * M + M * V:]


def _fold(gathered, hk, hv, start, stop, dims):
    """The states after the ranks [start, stop) given the states before them: the summaries applied in order."""
    B, H, K, M, V = dims
    for r in range(start, stop):
        hk_r, hv_r, D = _unpack(gathered[r], K, M, V)
        a = torch.exp(D)
        hk = hk * a[:, :, None, :] + hk_r
        hv = hv * a[:, :, :, None] + hv_r
    return hk, hv


class _Exchange(torch.autograd.Function):
    """combine(every rank's `local` stacked [N, ...], rank, *extra) -> tensors, with one all_gather
    forward and one all_reduce backward. Every output is this Function's on every rank (rank 0's too,
    which may not read the others' parts), so every rank's backward reaches the all_reduce."""

    @staticmethod
    def forward(ctx, combine, group, local, *extra):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        gathered = torch.stack(parts)
        ctx.save_for_backward(gathered, *extra)
        ctx.combine, ctx.group, ctx.rank = combine, group, rank
        return combine(gathered, rank, *extra)

    @staticmethod
    def backward(ctx, *d_out):
        gathered, *extra = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_() for x in (gathered, *extra)]
            grads = torch.autograd.grad(ctx.combine(inputs[0], ctx.rank, *inputs[1:]), inputs, d_out,
                                        allow_unused=True, materialize_grads=True)
        # every rank's loss may reach every rank's part (and the shared extra inputs): sum over ranks
        packed = torch.cat([x.reshape(-1) for x in grads])
        dist.all_reduce(packed, group=ctx.group)
        out, at = [], 0
        for x in grads:
            out.append(packed[at:at + x.numel()].view_as(x))
            at += x.numel()
        return (None, None, out[0][ctx.rank],
                *(d if need else None for d, need in zip(out[1:], ctx.needs_input_grad[3:])))


def _states_around(gathered, rank, hk0, hv0, dims):
    """(states entering this rank, states after the last rank) from every rank's summary."""
    hk_in, hv_in = _fold(gathered, hk0, hv0, 0, rank, dims)
    hk_end, hv_end = _fold(gathered, hk_in, hv_in, rank, gathered.shape[0], dims)
    return hk_in, hv_in, hk_end, hv_end


def preceding_inputs(x, width, group=None, first=None):
    """(the `width` inputs before this rank's slice [B, width, D], the whole sequences' last `width`
    inputs [B, width, D]) for x [B, T_r, D] split over the ranks of `group` as chunk_gsa_cp splits
    its inputs: what a causal convolution of `width` taps reads across slice boundaries. Rank 0's
    come from `first` (the inputs before the sequences, e.g. a conv cache) or zeros. Every rank needs
    T_r >= width (a slice that short would need inputs from two ranks back). Differentiable."""
    B, T, D = x.shape
    if T < width:
        raise ValueError(f"context parallel: every rank needs at least {width} tokens here (a short convolution "
                         f"of {width} taps reads across one slice boundary), got a slice of T = {T}")
    first = x.new_zeros(B, width, D) if first is None else first.to(x.dtype)
    return _Exchange.apply(_tails, group, x[:, T - width:], first)


def _tails(gathered, rank, first):
    return (gathered[rank - 1] if rank > 0 else first), gathered[-1]


def next_rank_first(x, group=None, fill=0):
    """x[:, :1] of the next rank (for x [B, T_r, ...] split as above), `fill` on the last rank: what a
    shift by one token (next-token labels) reads across a slice boundary. Not differentiable."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    parts = [torch.empty_like(x[:, :1]) for _ in range(world)]
    dist.all_gather(parts, x[:, :1].contiguous(), group=group)
    return parts[rank + 1] if rank + 1 < world else torch.full_like(x[:, :1], fill)


def all_ranks_sum(x, group=None):
    """The sum of x over the ranks of group (a new tensor; not differentiable)."""
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x
