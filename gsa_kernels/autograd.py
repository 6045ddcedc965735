"""Autograd of both ops: one backward formula per op, and the autograd Functions of eager calls.

A formula takes what the forward saved and the incoming gradients and returns the input gradients,
through a backward launcher `bwd` given by the caller. Eager calls pass the launcher itself (the
autograd Functions below, which skip the dispatcher: its ~70 us with autograd would be a visible share
of a step); the torch.library custom ops (ops.py, what torch.compile sees) pass their backward op. So
the two paths cannot drift apart: what a missing gradient means, which gradients exist, and which
thread's launch scope the backward's kernels see.

The launch scope (launches.launch_scope) is taken in the forward and entered around the backward
launches, because PyTorch runs a CUDA backward on its own worker thread: the backward's kernels then
launch with the override of the thread that ran the forward, and are recorded there.
"""
from __future__ import annotations

import torch

from gsa_kernels.launchers.chunk import chunk_gsa_bwd, chunk_gsa_train_fwd
from gsa_kernels.launchers.recurrent import recurrent_bwd, recurrent_fwd
from gsa_kernels.launches import in_launch_scope, launch_scope


def final_state_grads(dhk, dhv, hk_shape, hv_shape, device):
    """The final-state gradients as contiguous float32, a missing one (None, or the empty result of
    a custom op) as zeros; (None, None) when neither is given."""
    absent = lambda x: x is None or x.numel() == 0   # noqa: E731
    if absent(dhk) and absent(dhv):
        return None, None
    f32 = dict(dtype=torch.float32, device=device)
    dhk = torch.zeros(hk_shape, **f32) if absent(dhk) else dhk.float().contiguous()
    dhv = torch.zeros(hv_shape, **f32) if absent(dhv) else dhv.float().contiguous()
    return dhk, dhv


def chunk_gsa_backward(bwd, scope, saved, do, dhk_final, dhv_final, *, N: int):
    """(dq, dk, dv, ds, dg, dhk0, dhv0) of chunk_gsa; dhk0, dhv0 None without initial states.

    saved: (q, k, v, s, g, scores, hk_chunks, hv_chunks, hv_scales, hk0, hv0) as the forward left
    them (launchers/chunk.py `chunk_gsa_train_fwd`), the chunk states at checkpoint level 2 only those
    at the segment starts, or None (the backward rebuilds the rest), and the initial states None when
    there were none; do, dhk_final, dhv_final: the incoming gradients (None where nothing flows back);
    N: the number of sequences.
    bwd(q, k, v, s, g, do, dhk_final, dhv_final, scores, hk_chunks, hv_chunks, hv_scales, hk0, hv0) ->
    the seven gradients.
    """
    q, k, v, s, g, scores, hk_chunks, hv_chunks, hv_scales, hk0, hv0 = saved
    H, K, V, M = k.shape[2], k.shape[3], v.shape[3], s.shape[3]     # H: the kv heads (the states')
    do = torch.zeros(*q.shape[:3], V, dtype=v.dtype, device=v.device) if do is None else do.contiguous()
    dhk_final, dhv_final = final_state_grads(dhk_final, dhv_final, (N, H, K, M), (N, H, M, V), q.device)
    with in_launch_scope(scope):
        dq, dk, dv, ds, dg, dhk0, dhv0 = bwd(q, k, v, s, g, do, dhk_final, dhv_final, scores, hk_chunks,
                                             hv_chunks, hv_scales, hk0, hv0)
    if hk0 is None:
        dhk0 = dhv0 = None
    return dq, dk, dv, ds, dg, dhk0, dhv0


def fused_recurrent_gsa_backward(bwd, scope, saved, do, dhk_final, dhv_final):
    """(dq, dk, dv, ds, dg, dhk0, dhv0) of fused_recurrent_gsa; dhk0, dhv0 None without initial states.

    saved: (q, k, v, s, g, scores, hk0, hv0, hk_final, hv_final), the final states None unless the
    forward returned them (only then can a gradient flow back into them); do, dhk_final, dhv_final:
    the incoming gradients (None where nothing flows back).
    bwd(q, k, v, s, g, scores, hk0, hv0, hk_final, hv_final, do, dhk_final, dhv_final) -> the seven
    gradients.
    """
    q, k, v, s, g, scores, hk0, hv0, hk_final, hv_final = saved
    do = torch.zeros(*q.shape[:3], v.shape[3], dtype=v.dtype, device=v.device) if do is None else do.contiguous()
    dhk_final, dhv_final = (None, None) if hk_final is None else final_state_grads(
        dhk_final, dhv_final, hk_final.shape, hv_final.shape, q.device)
    with in_launch_scope(scope):
        dq, dk, dv, ds, dg, dhk0, dhv0 = bwd(q, k, v, s, g, scores, hk0, hv0, hk_final, hv_final, do,
                                             dhk_final, dhv_final)
    if hk0 is None:
        dhk0 = dhv0 = None
    return dq, dk, dv, ds, dg, dhk0, dhv0


class ChunkGSAFunction(torch.autograd.Function):
    """chunk_gsa with gradients, eager. Inputs contiguous, initial states float32 or None."""

    @staticmethod
    def forward(ctx, q, k, v, s, g, hk0, hv0, scale, output_final_state, layout, checkpoint_level):
        (o, scores, hk_chunks, hv_chunks, hv_scales, hk_final, hv_final,
         ctx.segment_chunks) = chunk_gsa_train_fwd(q, k, v, s, g, scale, hk0, hv0, output_final_state, layout,
                                                   checkpoint_level)
        ctx.save_for_backward(q, k, v, s, g, scores, hk_chunks, hv_chunks, hv_scales, hk0, hv0)
        ctx.scale, ctx.layout = scale, layout
        ctx.launch_scope = launch_scope()
        return o, hk_final, hv_final

    @staticmethod
    def backward(ctx, do, dhk_final, dhv_final):
        grads = chunk_gsa_backward(
            lambda *tensors: chunk_gsa_bwd(*tensors, ctx.layout, ctx.scale, ctx.segment_chunks),
            ctx.launch_scope, ctx.saved_tensors, do, dhk_final, dhv_final, N=ctx.layout.N)
        return (*grads, None, None, None, None)


class FusedRecurrentGSAFunction(torch.autograd.Function):
    """fused_recurrent_gsa with gradients, eager. Inputs contiguous, initial states float32 or None,
    cu_seqlens int32 on q's device or None, N the number of sequences."""

    @staticmethod
    def forward(ctx, q, k, v, s, g, hk0, hv0, scale, output_final_state, cu_seqlens, N):
        K = q.shape[-1]
        H, V, M = k.shape[2], v.shape[-1], s.shape[-1]     # H: the kv heads (the states')
        f32 = dict(dtype=torch.float32, device=q.device)
        hk_final = torch.empty(N, H, K, M, **f32) if output_final_state else None
        hv_final = torch.empty(N, H, M, V, **f32) if output_final_state else None
        o, scores = recurrent_fwd(q, k, v, s, g, scale, hk0, hv0, hk_final, hv_final, cu_seqlens, N)
        ctx.save_for_backward(q, k, v, s, g, scores, hk0, hv0, hk_final, hv_final, cu_seqlens)
        ctx.scale, ctx.N = scale, N
        ctx.launch_scope = launch_scope()
        return o, hk_final, hv_final

    @staticmethod
    def backward(ctx, do, dhk_final, dhv_final):
        *saved, cu_seqlens = ctx.saved_tensors
        grads = fused_recurrent_gsa_backward(
            lambda *tensors: recurrent_bwd(*tensors, cu_seqlens, ctx.scale, ctx.N),
            ctx.launch_scope, saved, do, dhk_final, dhv_final)
        return (*grads, None, None, None, None)
