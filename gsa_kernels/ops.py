"""The PyTorch custom operators that torch.compile sees: forward and backward of chunk_gsa and
fused_recurrent_gsa, and the decode step, each with a fake (meta) implementation, and autograd
registered on the forwards.

Why `torch.library.custom_op` and not `triton_op`: every op picks its launch configs from the tuned
table at run time, from the concrete work size (B*T*H, N*H buckets). Inside an opaque custom op that
lookup runs on real ints when the graph runs, so a compiled graph neither guards nor recompiles on T,
and the lookup stays off the traced code; `triton_op` would have Dynamo trace the lookup with
symbolic sizes. Inductor cannot fuse into these kernels either way.

Why eager calls do not go through these ops: the dispatcher costs about 25 us per op call on the host
(70 us with autograd), a visible share of a 30 us decode step or a 0.4 ms forward. So `chunk_gsa` and
`fused_recurrent_gsa` call their autograd.Functions directly in eager mode and these ops only while
compiling (`torch.compiler.is_compiling()`); both run the same launchers (launchers/) and the same
backward formulas (autograd.py), and tests/test_compile.py checks the ops with `opcheck` and a
compiled model against eager.

Optional results (final states not asked for, initial-state gradients without an initial state) are
empty tensors of shape [0]: a custom op returns tensors only.
"""
from __future__ import annotations

import torch

from gsa_kernels.autograd import chunk_gsa_backward, fused_recurrent_gsa_backward
from gsa_kernels.configs import launch_config, recompute_segment_chunks
from gsa_kernels.launchers.chunk import (ChunkLayout, chunk_gsa_bwd, chunk_gsa_train_fwd, keeps_compact_values,
                                         num_chunk_slots, stacked_chunk_limit)
from gsa_kernels.launchers.recurrent import decode_step, recurrent_bwd, recurrent_fwd
from gsa_kernels.launches import launch_scope

Tensor = torch.Tensor
NONE = (0,)     # the shape of an absent optional result


def _or_empty(x: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(NONE, dtype=torch.float32) if x is None else x


def _contiguous(*xs):
    return tuple(None if x is None else x.contiguous() for x in xs)


# ---------------------------------------------------------------------------------------------
# chunk_gsa
# ---------------------------------------------------------------------------------------------

def compiled_chunk_size(K: int, V: int, M: int, dtype: torch.dtype) -> int:
    """The chunk size of a call inside torch.compile: the tuned entry nearest to (K, V, M, dtype)
    whatever the work size, since the graph must know the saved states' shapes (chunk slots) without
    depending on T. Eager calls also weigh the work size (launch_config with tokens and seqs)."""
    return launch_config("chunk", K=K, V=V, M=M, dtype=dtype)["BT"]


def _chunk_size(q, k, v, s, chunk_size: int) -> int:
    """The call's chunk size: the given one, or (0) the tuned one for the static dims, capped for
    grouped query heads (launchers/chunk.py `stacked_chunk_limit`; chunk_gsa sends a group with no
    limit the repeated way). Also run by the fake implementations at trace time, where int() pins
    symbolic head dims (they are the model's constants) and leaves T symbolic."""
    BT = chunk_size or compiled_chunk_size(int(q.shape[-1]), int(v.shape[-1]), int(s.shape[-1]), q.dtype)
    group = int(q.shape[2]) // int(k.shape[2])
    return BT if group == 1 else min(BT, stacked_chunk_limit(group, int(s.shape[-1])))


def _chunk_layout(q, k, v, s, cu_seqlens, chunk_size: int) -> ChunkLayout:
    return ChunkLayout(q.shape[0], q.shape[1], _chunk_size(q, k, v, s, chunk_size), cu_seqlens, q.device)


def _segment_chunks(BT: int, N, H: int, K: int, V: int, checkpoint_level: int):
    """L of the segment starts kept at checkpoint level 2 (configs.recompute_segment_chunks), 0 where
    nothing is kept (other levels keep every chunk state)."""
    return recompute_segment_chunks(BT, N * H, K, V) if checkpoint_level == 2 else 0


def _saved_state_slots(B, T, BT: int, N, is_varlen: bool, L: int, checkpoint_level: int):
    """Slots of the chunk states the forward keeps: every chunk's, or at level 2 the starts' of
    L-chunk segments (a chunk layout of chunk size BT * L) or none (L 0). Also takes symbolic sizes."""
    if checkpoint_level != 2:
        return num_chunk_slots(B, T, BT, N, is_varlen)
    return num_chunk_slots(B, T, BT * L, N, is_varlen) if L else 0


@torch.library.custom_op("gsa_kernels::chunk_gsa_fwd", mutates_args=())
def chunk_gsa_fwd_op(q: Tensor, k: Tensor, v: Tensor, s: Tensor, g: Tensor,
                     hk0: Tensor | None, hv0: Tensor | None, cu_seqlens: Tensor | None,
                     scale: float, chunk_size: int, output_final_state: bool, checkpoint_level: int
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(o, scores, hk_chunks, hv_chunks, hv_scales, hk_final, hv_final); the middle four are the
    backward's (launchers/chunk.py `chunk_gsa_train_fwd`): the chunk states at checkpoint level 2 only
    those at the segment starts (the backward rebuilds the rest) or none
    (configs.recompute_segment_chunks), float32; at the other levels every chunk state, Hv of half
    inputs scaled float16 with its float32 scales (hv_scales, else empty).
    chunk_size 0: the tuned one for (K, V, M, dtype) (`compiled_chunk_size`). The chunk states go out
    flat (1-D): a [slots, H, K, M] result would make Dynamo guard on slots != 1, and recompile when T
    crosses one chunk."""
    q, k, v, s, g, hk0, hv0 = _contiguous(q, k, v, s, g, hk0, hv0)
    layout = _chunk_layout(q, k, v, s, cu_seqlens, chunk_size)
    o, scores, hk_chunks, hv_chunks, hv_scales, hk_final, hv_final, _ = chunk_gsa_train_fwd(
        q, k, v, s, g, scale, hk0, hv0, output_final_state, layout, checkpoint_level)
    return (o, scores, _or_empty(hk_chunks, q).reshape(-1), _or_empty(hv_chunks, q).reshape(-1),
            _or_empty(hv_scales, q).reshape(-1), _or_empty(hk_final, q), _or_empty(hv_final, q))


@chunk_gsa_fwd_op.register_fake
def _(q, k, v, s, g, hk0, hv0, cu_seqlens, scale, chunk_size, output_final_state, checkpoint_level):
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    BT = _chunk_size(q, k, v, s, chunk_size)
    L = _segment_chunks(BT, N, H, K, V, checkpoint_level)
    slots = _saved_state_slots(B, T, BT, N, cu_seqlens is not None, L, checkpoint_level)
    f32 = dict(dtype=torch.float32)
    compact_hv = keeps_compact_values(q.dtype, checkpoint_level)
    hv_states = dict(dtype=torch.float16) if compact_hv else f32
    return (q.new_empty(B, T, HQ, V), q.new_empty(B, T, HQ, M, **f32),
            q.new_empty(slots * H * K * M, **f32), q.new_empty(slots * H * M * V, **hv_states),
            q.new_empty(slots * H * V if compact_hv else NONE, **f32),
            q.new_empty(N, H, K, M, **f32) if output_final_state else q.new_empty(NONE, **f32),
            q.new_empty(N, H, M, V, **f32) if output_final_state else q.new_empty(NONE, **f32))


@torch.library.custom_op("gsa_kernels::chunk_gsa_bwd", mutates_args=())
def chunk_gsa_bwd_op(q: Tensor, k: Tensor, v: Tensor, s: Tensor, g: Tensor, do: Tensor,
                     dhk_final: Tensor | None, dhv_final: Tensor | None, scores: Tensor,
                     hk_chunks: Tensor, hv_chunks: Tensor, hv_scales: Tensor, hk0: Tensor | None,
                     hv0: Tensor | None, cu_seqlens: Tensor | None, scale: float, chunk_size: int,
                     checkpoint_level: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, ds, dg, dhk0, dhv0); dhk0 and dhv0 float32, empty without initial states. At
    checkpoint level 2 the chunk states given are the segment starts' (the rest are rebuilt from them)
    or empty (all are rebuilt from hk0, hv0); hv_scales: those of the forward's Hv where it kept them
    scaled float16 (levels 0 and 1, half inputs), else empty."""
    q, k, v, s, g, do, dhk_final, dhv_final, hk0, hv0 = _contiguous(q, k, v, s, g, do, dhk_final, dhv_final,
                                                                    hk0, hv0)
    if dhk_final is not None:   # the kernels read float32 states
        dhk_final, dhv_final = dhk_final.float(), dhv_final.float()
    layout = _chunk_layout(q, k, v, s, cu_seqlens, chunk_size)
    H, K, V, M = k.shape[2], k.shape[3], v.shape[3], s.shape[3]     # H: the kv heads (the states')
    L = _segment_chunks(layout.BT, layout.N, H, K, V, checkpoint_level)
    slots = _saved_state_slots(q.shape[0], q.shape[1], layout.BT, layout.N, layout.is_varlen, L,
                               checkpoint_level)
    if hk_chunks.numel() != slots * H * K * M:
        raise RuntimeError(f"chunk_gsa backward: the saved chunk states hold {hk_chunks.numel()} values, "
                           f"chunk size {layout.BT} at checkpoint level {checkpoint_level} needs {slots} x "
                           f"{H * K * M}: the tuned table changed between the forward and the backward")
    if slots:
        hk_chunks, hv_chunks = hk_chunks.view(-1, H, K, M), hv_chunks.view(-1, H, M, V)
    else:
        hk_chunks = hv_chunks = None
    hv_scales = hv_scales.view(-1, H, V) if hv_scales.numel() else None
    dq, dk, dv, ds, dg, dhk0, dhv0 = chunk_gsa_bwd(
        q, k, v, s, g, do, dhk_final, dhv_final, scores, hk_chunks, hv_chunks, hv_scales, hk0, hv0, layout,
        scale, L)
    if hk0 is None:
        dhk0 = dhv0 = None
    return dq, dk, dv, ds, dg, _or_empty(dhk0, q), _or_empty(dhv0, q)


@chunk_gsa_bwd_op.register_fake
def _(q, k, v, s, g, do, dhk_final, dhv_final, scores, hk_chunks, hv_chunks, hv_scales, hk0, hv0, cu_seqlens,
      scale, chunk_size, checkpoint_level):
    B, T, _, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    f32 = dict(dtype=torch.float32)
    dhk0 = q.new_empty(N, H, K, M, **f32) if hk0 is not None else q.new_empty(NONE, **f32)
    dhv0 = q.new_empty(N, H, M, V, **f32) if hk0 is not None else q.new_empty(NONE, **f32)
    return (*(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, s, g)),
            dhk0, dhv0)


def _chunk_setup_context(ctx, inputs, output):
    q, k, v, s, g, hk0, hv0, cu_seqlens, scale, chunk_size, _, checkpoint_level = inputs
    _, scores, hk_chunks, hv_chunks, hv_scales, _, _ = output
    ctx.save_for_backward(q, k, v, s, g, scores, hk_chunks, hv_chunks, hv_scales, hk0, hv0, cu_seqlens)
    ctx.scale, ctx.chunk_size, ctx.checkpoint_level = scale, chunk_size, checkpoint_level
    # holds for an eager call of the op; inside a compiled graph this runs once, at trace time, and
    # the graph's backward kernels see the thread that runs them
    ctx.launch_scope = launch_scope()
    ctx.mark_non_differentiable(scores, hk_chunks, hv_chunks, hv_scales)


def _chunk_backward(ctx, do, _dscores, _dhk_chunks, _dhv_chunks, _dhv_scales, dhk_final, dhv_final):
    *saved, cu_seqlens = ctx.saved_tensors
    q = saved[0]
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    grads = chunk_gsa_backward(
        lambda *tensors: chunk_gsa_bwd_op(*tensors, cu_seqlens, ctx.scale, ctx.chunk_size,
                                          ctx.checkpoint_level),
        ctx.launch_scope, saved, do, dhk_final, dhv_final, N=N)
    return (*grads, None, None, None, None, None)


chunk_gsa_fwd_op.register_autograd(_chunk_backward, setup_context=_chunk_setup_context)


def chunk_gsa_compiled(q, k, v, s, g, hk0, hv0, cu_seqlens, scale, chunk_size, output_final_state,
                       checkpoint_level):
    """chunk_gsa as custom ops: (o, hk_final or None, hv_final or None)."""
    o, _, _, _, _, hk, hv = chunk_gsa_fwd_op(q, k, v, s, g, hk0, hv0, cu_seqlens, scale, chunk_size,
                                          output_final_state, checkpoint_level)
    return o, (hk if output_final_state else None), (hv if output_final_state else None)


# ---------------------------------------------------------------------------------------------
# fused_recurrent_gsa
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("gsa_kernels::fused_recurrent_gsa_fwd", mutates_args=())
def recurrent_fwd_op(q: Tensor, k: Tensor, v: Tensor, s: Tensor, g: Tensor, hk0: Tensor | None,
                     hv0: Tensor | None, cu_seqlens: Tensor | None, scale: float,
                     output_final_state: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(o, scores, hk_final, hv_final); scores (float32) are the backward's."""
    q, k, v, s, g, hk0, hv0 = _contiguous(q, k, v, s, g, hk0, hv0)
    B, _, _, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]     # H: the kv heads (the states')
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    f32 = dict(dtype=torch.float32, device=q.device)
    hk_final = torch.empty(N, H, K, M, **f32) if output_final_state else None
    hv_final = torch.empty(N, H, M, V, **f32) if output_final_state else None
    o, scores = recurrent_fwd(q, k, v, s, g, scale, hk0, hv0, hk_final, hv_final, cu_seqlens, N)
    return o, scores, _or_empty(hk_final, q), _or_empty(hv_final, q)


@recurrent_fwd_op.register_fake
def _(q, k, v, s, g, hk0, hv0, cu_seqlens, scale, output_final_state):
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(B, T, HQ, V), q.new_empty(B, T, HQ, M, **f32),
            q.new_empty(N, H, K, M, **f32) if output_final_state else q.new_empty(NONE, **f32),
            q.new_empty(N, H, M, V, **f32) if output_final_state else q.new_empty(NONE, **f32))


@torch.library.custom_op("gsa_kernels::fused_recurrent_gsa_bwd", mutates_args=())
def recurrent_bwd_op(q: Tensor, k: Tensor, v: Tensor, s: Tensor, g: Tensor, scores: Tensor,
                     hk0: Tensor | None, hv0: Tensor | None, hk_final: Tensor | None,
                     hv_final: Tensor | None, do: Tensor, dhk_final: Tensor | None,
                     dhv_final: Tensor | None, cu_seqlens: Tensor | None, scale: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, ds, dg, dhk0, dhv0); the final states are needed with final-state gradients."""
    q, k, v, s, g, hk0, hv0, do, dhk_final, dhv_final = _contiguous(
        q, k, v, s, g, hk0, hv0, do, dhk_final, dhv_final)
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if dhk_final is not None:   # the kernels read float32 states
        dhk_final, dhv_final = dhk_final.float(), dhv_final.float()
    dq, dk, dv, ds, dg, dhk0, dhv0 = recurrent_bwd(
        q, k, v, s, g, scores, hk0, hv0, hk_final, hv_final, do, dhk_final, dhv_final,
        cu_seqlens, scale, N)
    return dq, dk, dv, ds, dg, _or_empty(dhk0, q), _or_empty(dhv0, q)


@recurrent_bwd_op.register_fake
def _(q, k, v, s, g, scores, hk0, hv0, hk_final, hv_final, do, dhk_final, dhv_final, cu_seqlens, scale):
    f32 = dict(dtype=torch.float32)
    dhk0 = q.new_empty(NONE, **f32) if hk0 is None else torch.empty_like(hk0, **f32)
    dhv0 = q.new_empty(NONE, **f32) if hv0 is None else torch.empty_like(hv0, **f32)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            torch.empty_like(s, memory_format=torch.contiguous_format),
            torch.empty_like(g, memory_format=torch.contiguous_format), dhk0, dhv0)


def _recurrent_setup_context(ctx, inputs, output):
    q, k, v, s, g, hk0, hv0, cu_seqlens, scale, output_final_state = inputs
    _, scores, hk_final, hv_final = output
    ctx.save_for_backward(q, k, v, s, g, scores, hk0, hv0,
                          hk_final if output_final_state else None,
                          hv_final if output_final_state else None, cu_seqlens)
    ctx.scale = scale
    ctx.launch_scope = launch_scope()
    ctx.mark_non_differentiable(scores)


def _recurrent_backward(ctx, do, _dscores, dhk_final, dhv_final):
    *saved, cu_seqlens = ctx.saved_tensors
    grads = fused_recurrent_gsa_backward(
        lambda *tensors: recurrent_bwd_op(*tensors, cu_seqlens, ctx.scale),
        ctx.launch_scope, saved, do, dhk_final, dhv_final)
    return (*grads, None, None, None)


recurrent_fwd_op.register_autograd(_recurrent_backward, setup_context=_recurrent_setup_context)


@torch.library.custom_op("gsa_kernels::decode_step", mutates_args=())
def decode_step_op(q: Tensor, k: Tensor, v: Tensor, s: Tensor, g: Tensor, hk0: Tensor | None,
                   hv0: Tensor | None, scale: float, store_state: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One token per sequence, no gradient: (o [B, 1, H, V], hk_new, hv_new), new float32 states
    (empty when not stored)."""
    q, k, v, s, g, hk0, hv0 = _contiguous(q, k, v, s, g, hk0, hv0)
    B, _, _, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]     # H: the kv heads (the states')
    f32 = dict(dtype=torch.float32, device=q.device)
    hk_new = torch.empty(B, H, K, M, **f32) if store_state else None
    hv_new = torch.empty(B, H, M, V, **f32) if store_state else None
    o = decode_step(q, k, v, s, g, scale, hk0, hv0, hk_new, hv_new)
    return o, _or_empty(hk_new, q), _or_empty(hv_new, q)


@decode_step_op.register_fake
def _(q, k, v, s, g, hk0, hv0, scale, store_state):
    B, _, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(B, 1, HQ, V),
            q.new_empty(B, H, K, M, **f32) if store_state else q.new_empty(NONE, **f32),
            q.new_empty(B, H, M, V, **f32) if store_state else q.new_empty(NONE, **f32))


def fused_recurrent_compiled(q, k, v, s, g, hk0, hv0, cu_seqlens, scale, output_final_state, decode):
    """fused_recurrent_gsa as custom ops: (o, hk_final or None, hv_final or None); `decode` (T = 1,
    no gradient) takes the decode step."""
    if decode:
        o, hk, hv = decode_step_op(q, k, v, s, g, hk0, hv0, scale, output_final_state)
    else:
        o, _, hk, hv = recurrent_fwd_op(q, k, v, s, g, hk0, hv0, cu_seqlens, scale, output_final_state)
    return o, (hk if output_final_state else None), (hv if output_final_state else None)
