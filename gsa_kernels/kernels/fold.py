"""The fold of the two-level state walk: segment summaries in order, into each segment's true start.

Over a segment of chunks the memories are linear in the memory entering it: with D the segment's
total log decay (the sum of its chunks' Gend, one value per slot) and E the state the segment builds
from zero (the first level, states.py with STORE_DECAY),

    Hk_out = Hk_in * exp(D)[None, :] + E_k          Hv_out = exp(D)[:, None] * Hv_in + E_v

and the backward's state gradients fold the same way, from the last segment to the first. So a
sequence's segments, walked in parallel from zero, become exact by one short serial pass per
sequence-head over its S segments (S of the order of the SMs over the walk's programs, not the
chunks): this kernel. It overwrites each summary E with the state entering its segment (the
second level re-walks each segment from there) and writes the state after the last one (the final
state, or for the backward the initial-state gradient). Context parallelism folds the same way
across GPUs.
"""
import triton
import triton.language as tl


@triton.jit
def _fold(summary, seg_decay, state_in, state_out, first, count, nh, h, off, mask, m,
          H: tl.constexpr, SIZE: tl.constexpr, M, R: tl.constexpr, C: tl.constexpr,
          DECAY_ON_COLUMNS: tl.constexpr, REVERSE: tl.constexpr, USE_STATE_IN: tl.constexpr,
          STORE_STATE_OUT: tl.constexpr):
    """Fold one [R, C] tile (at `off` within each [SIZE]-element state) of segments first .. first +
    count - 1 (in reverse with REVERSE). The slot axis (decay) is the columns of an Hk tile, the rows of
    an Hv tile."""
    state = tl.zeros((R, C), dtype=tl.float32)
    if USE_STATE_IN:
        state += tl.load(state_in + nh.to(tl.int64) * SIZE + off, mask=mask, other=0.0)
    for i in range(count):
        if REVERSE:
            j = first + count - 1 - i
        else:
            j = first + i
        index = (j * H + h).to(tl.int64)
        local = tl.load(summary + index * SIZE + off, mask=mask, other=0.0)
        tl.store(summary + index * SIZE + off, state, mask=mask)
        decay = tl.exp(tl.load(seg_decay + index * M + m, mask=m < M, other=0.0))
        if DECAY_ON_COLUMNS:
            state = state * decay[None, :] + local
        else:
            state = decay[:, None] * state + local
    if STORE_STATE_OUT:
        tl.store(state_out + nh.to(tl.int64) * SIZE + off, state, mask=mask)


@triton.jit
def fold_segments_kernel(summary_k, summary_v, seg_decay, hk_in, hv_in, hk_out, hv_out, segment_offsets, T,
                         segment_chunks, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                         BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         DO_KEYS: tl.constexpr, DO_VALUES: tl.constexpr, REVERSE: tl.constexpr,
                         USE_STATE_IN: tl.constexpr, STORE_STATE_OUT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Grid (tiles, N * H): with both memories, program `tile` < NK folds row tile [BK, BM] `tile` of the
    Hk summaries [segments, H, K, M] and the next NV the column tiles [BM, BV] of the Hv summaries
    [segments, H, M, V]; with one (DO_KEYS or DO_VALUES alone) one program per tile of it.
    The segments of sequence n are segment_offsets[n] .. segment_offsets[n + 1] - 1 (varlen), else
    n * S .. n * S + S - 1 with S = ceil(ceil(T / BT) / segment_chunks). hk_in / hv_in [N, H, ...]:
    the state entering the first segment (REVERSE: leaving the last) when USE_STATE_IN; hk_out /
    hv_out: the state after the fold when STORE_STATE_OUT."""
    tile, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    NK: tl.constexpr = (K + BK - 1) // BK
    if IS_VARLEN:
        first = tl.load(segment_offsets + n)
        count = tl.load(segment_offsets + n + 1) - first
    else:
        count = tl.cdiv(tl.cdiv(T, BT), segment_chunks)
        first = n * count
    m = tl.arange(0, BM)
    if not DO_VALUES:
        _fold_keys(summary_k, seg_decay, hk_in, hk_out, first, count, nh, h, tile, m, H, K, M, BK, BM,
                   REVERSE, USE_STATE_IN, STORE_STATE_OUT)
    elif not DO_KEYS:
        _fold_values(summary_v, seg_decay, hv_in, hv_out, first, count, nh, h, tile, m, H, V, M, BV, BM,
                     REVERSE, USE_STATE_IN, STORE_STATE_OUT)
    elif tile < NK:
        _fold_keys(summary_k, seg_decay, hk_in, hk_out, first, count, nh, h, tile, m, H, K, M, BK, BM,
                   REVERSE, USE_STATE_IN, STORE_STATE_OUT)
    else:
        _fold_values(summary_v, seg_decay, hv_in, hv_out, first, count, nh, h, tile - NK, m, H, V, M, BV, BM,
                     REVERSE, USE_STATE_IN, STORE_STATE_OUT)


@triton.jit
def _fold_keys(summary, seg_decay, state_in, state_out, first, count, nh, h, tile, m, H: tl.constexpr,
               K: tl.constexpr, M: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, REVERSE: tl.constexpr,
               USE_STATE_IN: tl.constexpr, STORE_STATE_OUT: tl.constexpr):
    kk = tile * BK + tl.arange(0, BK)
    _fold(summary, seg_decay, state_in, state_out, first, count, nh, h, kk[:, None] * M + m[None, :],
          (kk < K)[:, None] & (m < M)[None, :], m, H, K * M, M, BK, BM, True, REVERSE, USE_STATE_IN,
          STORE_STATE_OUT)


@triton.jit
def _fold_values(summary, seg_decay, state_in, state_out, first, count, nh, h, tile, m, H: tl.constexpr,
                 V: tl.constexpr, M: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr, REVERSE: tl.constexpr,
                 USE_STATE_IN: tl.constexpr, STORE_STATE_OUT: tl.constexpr):
    vv = tile * BV + tl.arange(0, BV)
    _fold(summary, seg_decay, state_in, state_out, first, count, nh, h, m[:, None] * V + vv[None, :],
          (m < M)[:, None] & (vv < V)[None, :], m, H, M * V, M, BM, BV, False, REVERSE, USE_STATE_IN,
          STORE_STATE_OUT)
