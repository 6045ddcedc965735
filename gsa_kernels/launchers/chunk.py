"""Launchers of the chunkwise kernels: chunk tables, grids and launch configs, then the launches.

Forward, 3 launches:  chunk_cumsum (G) -> states_fwd (hk, hv at every chunk start, and the final
                      states) -> chunk_fwd (scores, softmax, o per chunk).
Backward, 5 launches: chunk_cumsum (G again, cheaper than keeping it) -> chunk_bwd_dscores (p, dz,
                      dG_loc per chunk) -> states_bwd (dhk, dhv at every chunk end, and the
                      initial-state gradients) -> chunk_bwd_keys (dq, dk, the keys' share of ds)
                      -> chunk_bwd_values (dv, ds, dg).
Saved for the backward: the inputs, the float32 scores [B, T, H, M] and, at checkpoint level 0 or 1,
the chunk states (Hk float32; Hv scaled float16 for half inputs). At level 2 only the states at the
start of every segment of L chunks (configs.recompute_segment_chunks, 1 / L of them), or none where
the walk fills the GPU, live between forward and backward: the backward rebuilds the chunk states
from those starts, all segments side by side (or from each sequence's start), and walks the two
memories' gradients in two launches (7 in all), keys then values, freeing the keys' states before the
values' walk.
For half inputs the forward stores Hv as scaled float16 at every level, and the state gradients and
level 2's rebuilt states are scaled float16.
No host sync anywhere: varlen chunk tables are built on the device with a host-known upper bound.

Grouped query heads: q (and do) with HQ = H * group heads over k, v, s, g with H. The gates, the
walks and the states are per kv head (1 / group of the state bytes and walk work of repeating the
kv heads); the chunk kernels run per query head and read their kv head's memory. dk, dv, ds and dg
sum over a group: their kernels write float32 shares per query head, summed here.
"""
from __future__ import annotations

import torch

from gsa_kernels.configs import launch_config, recompute_segment_chunks, walk_segment_chunks
from gsa_kernels.intmath import cdiv, next_pow2, pow2_at_least
from gsa_kernels.kernels.chunk_bwd import chunk_bwd_dscores_kernel, chunk_bwd_keys_kernel, chunk_bwd_values_kernel
from gsa_kernels.kernels.chunk_fwd import chunk_fwd_kernel
from gsa_kernels.kernels.cumsum import chunk_cumsum_kernel
from gsa_kernels.kernels.fold import fold_segments_kernel
from gsa_kernels.kernels.states import states_bwd_kernel, states_fwd_kernel
from gsa_kernels.launches import amend_launch


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get IEEE float32 dots (the contract is 1e-5); half inputs get tf32 for the dots
    whose operands are float32 intermediates (states, probabilities), which bf16 would round (the
    state walks and chunk_fwd's q Hk do better: kernels/dots.py)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_chunk_slots(B: int, T: int, BT: int, N: int, is_varlen: bool):
    """Chunk slots of the saved states: B * ceil(T / BT); packed (varlen), the host-known bound
    T // BT + N >= sum_n ceil(len_n / BT), so no sync sizes the grid. Also takes symbolic sizes."""
    return T // BT + N if is_varlen else B * ((T + BT - 1) // BT)


class ChunkLayout:
    """Where every chunk lives: the chunk slots of the saved states, and for varlen the device tables
    (sequence offsets, first slot of each sequence, and (sequence, chunk) of every slot)."""

    def __init__(self, B: int, T: int, BT: int, cu_seqlens: torch.Tensor | None, device):
        self.B, self.BT, self.T = B, BT, T
        self.is_varlen = cu_seqlens is not None
        if not self.is_varlen:
            self.N = B
            self.num_slots = num_chunk_slots(B, T, BT, B, False)
            self.cu = self.chunk_offsets = self.table = None
            return
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        self.N = cu.numel() - 1
        lengths = cu[1:] - cu[:-1]
        chunks = (lengths + BT - 1) // BT
        offsets = torch.zeros(self.N + 1, dtype=torch.int32, device=device)
        offsets[1:] = torch.cumsum(chunks, 0)
        self.num_slots = num_chunk_slots(B, T, BT, self.N, True)
        slot = torch.arange(self.num_slots, dtype=torch.int32, device=device)
        seq = torch.searchsorted(offsets[1:].contiguous(), slot, right=True).to(torch.int32)
        valid = slot < offsets[-1]
        seq_c = seq.clamp(max=self.N - 1)
        within = slot - offsets[seq_c.long()]
        table = torch.stack([torch.where(valid, seq_c, -1), torch.where(valid, within, 0)], 1)
        self.cu, self.chunk_offsets, self.table = cu, offsets, table.to(torch.int32).contiguous()

    def ptrs(self, dummy):
        """(cu_seqlens, chunk_offsets, chunk_table) kernel arguments; a dummy where not varlen."""
        if self.is_varlen:
            return self.cu, self.chunk_offsets, self.table
        return dummy, dummy, dummy


def _grid_states(K, V, cfg, N, H):
    """The state walks: per sequence-head, one program per (Hk tile, Hv tile) pair, or with SPLIT one
    per Hk tile plus one per Hv tile (kernels/states.py)."""
    nk, nv = cdiv(K, cfg["BK"]), cdiv(V, cfg["BV"])
    return (nk + nv if cfg["SPLIT"] else max(nk, nv), N * H)


def _warps(cfg):
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def chunk_gates(g, layout: ChunkLayout):
    """G = within-chunk cumulative sum of g, float32 [B, T, H, M]."""
    B, T, H, M = g.shape
    G = torch.empty(B, T, H, M, dtype=torch.float32, device=g.device)
    cu, _, table = layout.ptrs(g)
    chunk_cumsum_kernel[(layout.num_slots, H)](
        g, G, cu, table, T, H=H, M=M, BT=layout.BT, BM=pow2_at_least(M),
        IS_VARLEN=layout.is_varlen, num_warps=4)
    return G


class Segments:
    """The two-level walk's segments (kernels/fold.py): `chunks` chunks of one sequence each, laid out
    as the chunks of a chunk size BT * chunks (ChunkLayout: slots, and for varlen the device table of
    (sequence, segment in it) and each sequence's first segment), with their float32 summaries."""

    def __init__(self, B: int, T: int, layout: ChunkLayout, chunks: int, H: int, K: int, V: int, M: int, device):
        self.chunks = chunks
        self.layout = ChunkLayout(B, T, layout.BT * chunks, layout.cu, device)
        f32 = dict(dtype=torch.float32, device=device)
        slots = self.layout.num_slots
        self.summary_k = torch.empty(slots, H, K, M, **f32)
        self.summary_v = torch.empty(slots, H, M, V, **f32)
        self.log_decay = torch.empty(slots, H, M, **f32)

    def rows(self, H: int) -> int:
        return self.layout.num_slots * H


def _walk_plan(kernel, cfg, layout: ChunkLayout, B, T, H, K, V, M, device, keys=True, values=True):
    """(config, tile programs per walk row, Segments or None) of a state walk. SEGMENT 0 resolves here
    (configs.walk_segment_chunks, from the walk's programs and the chunks of a sequence); where it
    picks two levels the tiles are paired, since the segments then fill the GPU and a paired program
    loads each chunk's G and s once for two tiles (H200, [1, 32768, 4, 512, 64]: forward 1.34 ms
    split, 1.05 ms paired). The record of the launch (`last_launches`) shows the resolved config."""
    def tiles_of(c):
        if keys and values:
            return _grid_states(K, V, c, layout.N, H)[0]
        return cdiv(K, c["BK"]) if keys else cdiv(V, c["BV"])

    chunks = cdiv(T, layout.BT)     # of a sequence (varlen: of the longest there could be)
    tiles = tiles_of(cfg)
    L = walk_segment_chunks(cfg["SEGMENT"], tiles * layout.N * H, chunks)
    if L and cfg["SEGMENT"] == 0:
        cfg = dict(cfg, SPLIT=0)
        tiles = tiles_of(cfg)
        cfg["SEGMENT"] = walk_segment_chunks(0, tiles * layout.N * H, chunks) or L
        L = cfg["SEGMENT"]
        amend_launch(kernel, cfg)
    return cfg, tiles, (Segments(B, T, layout, L, H, K, V, M, device) if L else None)


# Which chunk states a forward walk stores as scaled float16 (kernels/states.py `_store_scaled`), as
# (Hk, Hv): none (float32 inputs); Hv only (a training forward of half inputs: the scores the
# backward reads need Hk's float32 bits, kernels/chunk_fwd.py); both (the forward-only path, and
# level 2's rebuilt states, which enter only products).
FLOAT32_STATES = (False, False)
COMPACT_VALUES = (False, True)
COMPACT_STATES = (True, True)


def training_states(dtype) -> tuple[bool, bool]:
    """What a training forward's walk stores as scaled float16, at every checkpoint level."""
    return FLOAT32_STATES if dtype == torch.float32 else COMPACT_VALUES


def keeps_compact_values(dtype, checkpoint_level: int) -> bool:
    """Whether chunk_gsa_train_fwd keeps Hv's chunk states scaled float16 with their scales (levels 0
    and 1 of half inputs; level 2 keeps float32 segment starts or nothing)."""
    return checkpoint_level != 2 and training_states(dtype)[1]


def _empty_states(layout: ChunkLayout, H, K, V, M, compact, device):
    """(hk_chunks, hv_chunks, hk_scales, hv_scales) to be written by a forward walk: float32, or
    scaled float16 with float32 scales where compact (Hk, Hv) says so (else the scales are None)."""
    f32 = dict(dtype=torch.float32, device=device)
    compact_hk, compact_hv = compact
    hk_chunks = torch.empty(layout.num_slots, H, K, M, dtype=torch.float16 if compact_hk else torch.float32,
                            device=device)
    hv_chunks = torch.empty(layout.num_slots, H, M, V, dtype=torch.float16 if compact_hv else torch.float32,
                            device=device)
    hk_scales = torch.empty(layout.num_slots, H, K, **f32) if compact_hk else None
    hv_scales = torch.empty(layout.num_slots, H, V, **f32) if compact_hv else None
    if layout.is_varlen:
        # the slot count is a bound; the unused slots (all among the last N) are zeroed, so that
        # every output of the op is defined (the custom op returns these states)
        hk_chunks[-layout.N:].zero_()
        hv_chunks[-layout.N:].zero_()
    return hk_chunks, hv_chunks, hk_scales, hv_scales


def chunk_states_fwd(k, v, s, G, hk0, hv0, layout: ChunkLayout, output_final_state=False,
                     compact=FLOAT32_STATES):
    """The forward state walk: (hk_chunks, hv_chunks, hk_scales, hv_scales, hk_final, hv_final), Hk and
    Hv at every chunk start. compact (Hk, Hv): which are scaled float16 with their float32 scales (the
    scales of the others None); the walk's config is states_fwd_compact where both are, else
    states_fwd. The backward of checkpoint level 2 runs it again on the same G: each step is the
    forward's, so the states it rebuilds are the forward's up to how each is stored.
    With segments (the config's SEGMENT, configs.walk_segment_chunks) the walk takes two levels: every
    segment walked from zero, recording its end state and log decay; the fold (kernels/fold.py) into
    each segment's true start; every segment walked again from it, storing the chunk states."""
    B, T, H, K = k.shape
    V, M = v.shape[-1], s.shape[-1]
    N, BT = layout.N, layout.BT
    cu, offsets, _ = layout.ptrs(k)
    f32 = dict(dtype=torch.float32, device=k.device)
    hk_chunks, hv_chunks, hk_scales, hv_scales = _empty_states(layout, H, K, V, M, compact, k.device)
    hk_final = torch.empty(N, H, K, M, **f32) if output_final_state else None
    hv_final = torch.empty(N, H, M, V, **f32) if output_final_state else None
    kernel = "states_fwd_compact" if compact == COMPACT_STATES else "states_fwd"
    cfg = launch_config(kernel, K=K, V=V, M=M, dtype=k.dtype, BT=BT, tokens=B * T * H, seqs=N * H)
    cfg, tiles, segments = _walk_plan(kernel, cfg, layout, B, T, H, K, V, M, k.device)
    dummy = k     # the pointer passed for an absent tensor; the kernel never reads it
    opt = lambda x: dummy if x is None else x   # noqa: E731
    common = dict(H=H, K=K, V=V, M=M, BT=BT, BM=pow2_at_least(M), BK=cfg["BK"], BV=cfg["BV"],
                  IS_VARLEN=layout.is_varlen, **_warps(cfg))
    walk = dict(common, SPLIT=cfg["SPLIT"], PREC=dot_precision(k.dtype), COMPACT_HK=compact[0],
                COMPACT_HV=compact[1])
    if segments is None:
        states_fwd_kernel[(tiles, N * H)](
            k, v, s, G, opt(hk0), opt(hv0), hk_chunks, hv_chunks, opt(hk_scales), opt(hv_scales),
            opt(hk_final), opt(hv_final), dummy, cu, offsets, dummy, T, 1, SEGMENTED=False,
            USE_INITIAL_STATE=hk0 is not None, STORE_CHUNKS=True, STORE_FINAL_STATE=output_final_state,
            STORE_DECAY=False, **walk)
        return hk_chunks, hv_chunks, hk_scales, hv_scales, hk_final, hv_final
    seg = segments.layout
    _, seg_offsets, seg_table = seg.ptrs(k)
    # level 1: each segment from zero, its end state into the summaries
    states_fwd_kernel[(tiles, segments.rows(H))](
        k, v, s, G, dummy, dummy, dummy, dummy, dummy, dummy, segments.summary_k, segments.summary_v,
        segments.log_decay, cu, offsets, seg_table, T, segments.chunks, SEGMENTED=True,
        USE_INITIAL_STATE=False, STORE_CHUNKS=False, STORE_FINAL_STATE=True, STORE_DECAY=True, **walk)
    fold_segments_kernel[(cdiv(K, cfg["BK"]) + cdiv(V, cfg["BV"]), N * H)](
        segments.summary_k, segments.summary_v, segments.log_decay, opt(hk0), opt(hv0), opt(hk_final),
        opt(hv_final), seg_offsets, T, segments.chunks, DO_KEYS=True, DO_VALUES=True, REVERSE=False,
        USE_STATE_IN=hk0 is not None, STORE_STATE_OUT=output_final_state, **common)
    # level 2: each segment again from its true start (the fold left it in the summaries)
    states_fwd_kernel[(tiles, segments.rows(H))](
        k, v, s, G, segments.summary_k, segments.summary_v, hk_chunks, hv_chunks, opt(hk_scales),
        opt(hv_scales), dummy, dummy, dummy, cu, offsets, seg_table, T, segments.chunks, SEGMENTED=True,
        USE_INITIAL_STATE=True, STORE_CHUNKS=True, STORE_FINAL_STATE=False, STORE_DECAY=False, **walk)
    return hk_chunks, hv_chunks, hk_scales, hv_scales, hk_final, hv_final


def segment_starts(hk_chunks, hv_chunks, layout: ChunkLayout, L: int, hv_scales=None):
    """(hk_starts, hv_starts): the float32 chunk states at the start of every segment of L chunks,
    [segment slots, H, K, M] and [segment slots, H, M, V], the slots those of ChunkLayout(B, T, BT * L)
    (a padding slot of varlen holds its sequence's first state; nothing walks it). What checkpoint
    level 2 keeps for chunk_states_from_starts. Hv given with its scales is scaled float16: its starts
    are taken back to float32 (exactly: each is a float16 times a power of two)."""
    seg = ChunkLayout(layout.B, layout.T, layout.BT * L, layout.cu, hk_chunks.device)
    if layout.is_varlen:
        sequence, segment = seg.table[:, 0].long(), seg.table[:, 1].long()
        first = layout.chunk_offsets[sequence.clamp(min=0)].long() + segment * L
        index = torch.where(sequence >= 0, first, 0)
        take = lambda x: x.index_select(0, index)     # noqa: E731
    else:
        B, chunks = layout.B, layout.num_slots // layout.B
        # a copy, never a view: the kernel reads the starts as contiguous rows, and a view would keep
        # every chunk state alive until the backward
        take = lambda x: x.view(B, chunks, *x.shape[1:])[:, ::L].contiguous().view(-1, *x.shape[1:])   # noqa: E731
    hk_starts, hv_starts = take(hk_chunks), take(hv_chunks)
    if hv_scales is not None:
        hv_starts = hv_starts.float() * take(hv_scales)[..., None, :]     # Hv's columns
    return hk_starts, hv_starts


def chunk_states_from_starts(k, v, s, G, hk_starts, hv_starts, layout: ChunkLayout, L: int,
                             compact=FLOAT32_STATES):
    """(hk_chunks, hv_chunks, hk_scales, hv_scales): the chunk states rebuilt from segment_starts'
    starts, every L-chunk segment walked at once from its start (the two-level walk's second level
    with the starts given). Each step is the forward walk's own, so the states come out as the
    forward's, bit for bit where the stored dtype is the same. The walk's tiles and warps are the
    forward walk's config (states_fwd, or states_fwd_compact for scaled float16 states), its tiles
    paired where a sequence has more than one segment (as _walk_plan pairs them for two levels: the
    segments fill the GPU, and a paired program loads each chunk's G and s once for two tiles). The
    launch record keeps the looked-up config: `SEGMENT` there is the choice for a walk from the
    sequence start, which this is not."""
    B, T, H, K = k.shape
    V, M = v.shape[-1], s.shape[-1]
    BT = layout.BT
    cu, offsets, _ = layout.ptrs(k)
    seg = ChunkLayout(B, T, BT * L, layout.cu, k.device)
    _, _, seg_table = seg.ptrs(k)
    hk_chunks, hv_chunks, hk_scales, hv_scales = _empty_states(layout, H, K, V, M, compact, k.device)
    kernel = "states_fwd_compact" if compact == COMPACT_STATES else "states_fwd"
    cfg = launch_config(kernel, K=K, V=V, M=M, dtype=k.dtype, BT=BT, tokens=B * T * H, seqs=layout.N * H)
    if cdiv(T, BT) > L:     # of a sequence (varlen: of the longest there could be)
        cfg = dict(cfg, SPLIT=0)
    tiles = _grid_states(K, V, cfg, layout.N, H)[0]
    dummy = k
    opt = lambda x: dummy if x is None else x   # noqa: E731
    states_fwd_kernel[(tiles, seg.num_slots * H)](
        k, v, s, G, hk_starts, hv_starts, hk_chunks, hv_chunks, opt(hk_scales), opt(hv_scales), dummy, dummy,
        dummy, cu, offsets, seg_table, T, L, H=H, K=K, V=V, M=M, BT=BT, BM=pow2_at_least(M), BK=cfg["BK"],
        BV=cfg["BV"], IS_VARLEN=layout.is_varlen, SPLIT=cfg["SPLIT"], PREC=dot_precision(k.dtype),
        COMPACT_HK=compact[0], COMPACT_HV=compact[1], SEGMENTED=True, USE_INITIAL_STATE=True, STORE_CHUNKS=True,
        STORE_FINAL_STATE=False, STORE_DECAY=False, **_warps(cfg))
    return hk_chunks, hv_chunks, hk_scales, hv_scales


def chunk_gsa_fwd(q, k, v, s, g, scale, hk0, hv0, output_final_state, layout: ChunkLayout,
                  compact=FLOAT32_STATES):
    """The forward launches: (o, scores, hk_chunks, hv_chunks, hk_scales, hv_scales, hk_final,
    hv_final). compact (Hk, Hv): which chunk states the walk stores as scaled float16 with their
    float32 scales, half the bytes of float32 at the same precision as the tf32 dots that read them
    (kernels/states.py `_store_scaled`; the other scales None). COMPACT_STATES is the forward-only
    path of half inputs: its configs are the _compact ones, and it stores no scores (None); otherwise
    the float32 slot scores are stored for a backward."""
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]
    N, BT, BM = layout.N, layout.BT, pow2_at_least(M)
    cu, _, table = layout.ptrs(q)
    forward_only = compact == COMPACT_STATES
    G = chunk_gates(g, layout)
    hk_chunks, hv_chunks, hk_scales, hv_scales, hk_final, hv_final = chunk_states_fwd(
        k, v, s, G, hk0, hv0, layout, output_final_state, compact)

    o = torch.empty(B, T, HQ, V, dtype=q.dtype, device=q.device)
    scores = None if forward_only else torch.empty(B, T, HQ, M, dtype=torch.float32, device=q.device)
    cfg = launch_config("chunk_fwd_compact" if forward_only else "chunk_fwd", K=K, V=V, M=M, dtype=q.dtype,
                        BT=BT, tokens=B * T * HQ, seqs=N * HQ)
    # each program flags whether its output holds a non-finite value; the second launch computes the
    # flagged chunks again so that no such value reaches an earlier row (kernels/chunk_fwd.py)
    bad_chunks = torch.empty(layout.num_slots, HQ, dtype=torch.int32, device=q.device)
    for safe in (False, True):
        chunk_fwd_kernel[(layout.num_slots, HQ)](
            q, k, v, s, G, hk_chunks, hv_chunks, q if hk_scales is None else hk_scales,
            q if hv_scales is None else hv_scales, o, q if scores is None else scores, cu, table, bad_chunks,
            scale, T, H=H, K=K, V=V, M=M, BT=BT, BM=BM, BK=cfg["BK"], BV=cfg["BV"],
            IS_VARLEN=layout.is_varlen, PREC=dot_precision(q.dtype), COMPACT_HK=compact[0],
            COMPACT_HV=compact[1], STORE_SCORES=not forward_only, GROUP=HQ // H, SAFE=safe, **_warps(cfg))
    return o, scores, hk_chunks, hv_chunks, hk_scales, hv_scales, hk_final, hv_final


def chunk_gsa_train_fwd(q, k, v, s, g, scale, hk0, hv0, output_final_state, layout: ChunkLayout,
                        checkpoint_level: int):
    """The forward of a call with gradients and what it keeps for chunk_gsa_bwd: (o, scores, hk_kept,
    hv_kept, hv_scales, hk_final, hv_final, segment_chunks).

    For half inputs the walk stores Hv as scaled float16 (COMPACT_VALUES) at every level: Hv enters
    only o = p Hv and the backward's products, where 11 bits are what the tf32 dots keep; Hk stays
    float32 for the scores the backward reads (kernels/chunk_fwd.py). A quarter fewer state bytes
    stored and read.
    Levels 0 and 1 keep every chunk state (segment_chunks 0), Hv with its scales (hv_scales, None for
    float32 inputs). Level 2 keeps the float32 states at the start of every segment of
    L = segment_chunks chunks (configs.recompute_segment_chunks), or none (hk_kept, hv_kept None,
    segment_chunks 0); its hv_scales are None."""
    o, scores, hk_chunks, hv_chunks, _, hv_scales, hk_final, hv_final = chunk_gsa_fwd(
        q, k, v, s, g, scale, hk0, hv0, output_final_state, layout, compact=training_states(q.dtype))
    if checkpoint_level != 2:
        return o, scores, hk_chunks, hv_chunks, hv_scales, hk_final, hv_final, 0
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    L = recompute_segment_chunks(layout.BT, layout.N * H, K, V)
    if not L:
        return o, scores, None, None, None, hk_final, hv_final, 0
    hk_starts, hv_starts = segment_starts(hk_chunks, hv_chunks, layout, L, hv_scales=hv_scales)
    return o, scores, hk_starts, hv_starts, None, hk_final, hv_final, L


# The reverse walk stacks a group's rows into one dot ([BT * GP, BM] tiles of dz, p and G per step);
# its shared memory grows with BT * GP * BM (sm90, half inputs, K = V = 512 tiles of 64: 384 bytes a
# stacked row at M = 64 with num_stages 1, three times that with 2), so grouped calls keep
# BT * GP * BM within STACKED_ELEMENTS and take one stage past PIPELINED_ELEMENTS.
STACKED_ELEMENTS = 16384
PIPELINED_ELEMENTS = 8192


def stacked_chunk_limit(group: int, M: int) -> int:
    """The largest chunk size (64, 32 or 16) whose stacked reverse walk fits for this group and M;
    0 when none does (the op then repeats the kv heads). Without grouping nothing is stacked: 64."""
    if group == 1:
        return 64
    rows = STACKED_ELEMENTS // (next_pow2(group) * pow2_at_least(M))
    return next((bt for bt in (64, 32, 16) if bt <= rows), 0)


def stacked_walk(cfg: dict, BT: int, group: int, M: int):
    """(GP, config) of a reverse walk over `group` query heads per kv head: the stacked rows' power of
    two, and the config with one stage where the stacked tiles would not fit with more."""
    GP = next_pow2(group)
    if BT * GP * pow2_at_least(M) > PIPELINED_ELEMENTS:
        cfg = dict(cfg, num_stages=1)
    return GP, cfg


def chunk_states_bwd(q, do, dz, p, G, dhk_final, dhv_final, dhk0, dhv0, layout: ChunkLayout,
                     keys=True, values=True, compact=False):
    """The reverse state walk of the keys' memory, the values' memory or both: (dhk_chunks, dhv_chunks,
    dhk_scales, dhv_scales), the gradients w.r.t. the state at every chunk end (None for a memory not
    walked; the scales None unless compact), and the initial-state gradients written into dhk0 / dhv0.
    dz may be None when the keys' memory is not walked. Segments as in chunk_states_fwd, the fold
    from the last segment to the first. Per kv head (G's heads); q, do, dz and p per query head."""
    B, T, HQ, K = q.shape
    H, V, M = G.shape[2], do.shape[-1], p.shape[-1]
    N, BT = layout.N, layout.BT
    cu, offsets, _ = layout.ptrs(q)
    f32 = dict(dtype=torch.float32, device=q.device)
    states = dict(dtype=torch.float16 if compact else torch.float32, device=q.device)
    dhk_chunks = torch.empty(layout.num_slots, H, K, M, **states) if keys else None
    dhv_chunks = torch.empty(layout.num_slots, H, M, V, **states) if values else None
    dhk_scales = torch.empty(layout.num_slots, H, K, **f32) if keys and compact else None
    dhv_scales = torch.empty(layout.num_slots, H, V, **f32) if values and compact else None
    cfg = launch_config("states_bwd", K=K, V=V, M=M, dtype=q.dtype, BT=BT, tokens=B * T * H, seqs=N * H)
    GP, stacked = stacked_walk(cfg, BT, HQ // H, M)
    if stacked != cfg:
        cfg = stacked
        amend_launch("states_bwd", cfg)
    cfg, tiles, segments = _walk_plan("states_bwd", cfg, layout, B, T, H, K, V, M, q.device, keys, values)
    use_dht = dhk_final is not None
    dummy = q     # the pointer passed for an absent tensor; the kernel never reads it
    opt = lambda x: dummy if x is None else x   # noqa: E731
    common = dict(H=H, K=K, V=V, M=M, BT=BT, BM=pow2_at_least(M), BK=cfg["BK"], BV=cfg["BV"],
                  IS_VARLEN=layout.is_varlen, **_warps(cfg))
    walk = dict(common, SPLIT=cfg["SPLIT"], DO_KEYS=keys, DO_VALUES=values, PREC=dot_precision(q.dtype),
                COMPACT=compact, GROUP=HQ // H, GP=GP)
    chunk_out = (opt(dhk_chunks), opt(dhv_chunks), opt(dhk_scales), opt(dhv_scales))
    if segments is None:
        states_bwd_kernel[(tiles, N * H)](
            q, do, opt(dz), p, G, opt(dhk_final), opt(dhv_final), *chunk_out, dhk0, dhv0, dummy,
            cu, offsets, dummy, T, 1, SEGMENTED=False, USE_FINAL_STATE_GRADIENT=use_dht, STORE_CHUNKS=True,
            STORE_INITIAL=True, STORE_DECAY=False, **walk)
        return dhk_chunks, dhv_chunks, dhk_scales, dhv_scales
    _, seg_offsets, seg_table = segments.layout.ptrs(q)
    # level 1: each segment backwards from zero, the gradient at its start into the summaries
    states_bwd_kernel[(tiles, segments.rows(H))](
        q, do, opt(dz), p, G, dummy, dummy, dummy, dummy, dummy, dummy, segments.summary_k,
        segments.summary_v, segments.log_decay, cu, offsets, seg_table, T, segments.chunks, SEGMENTED=True,
        USE_FINAL_STATE_GRADIENT=False, STORE_CHUNKS=False, STORE_INITIAL=True, STORE_DECAY=True, **walk)
    fold_segments_kernel[(tiles if not (keys and values) else cdiv(K, cfg["BK"]) + cdiv(V, cfg["BV"]), N * H)](
        segments.summary_k, segments.summary_v, segments.log_decay, opt(dhk_final), opt(dhv_final), dhk0, dhv0,
        seg_offsets, T, segments.chunks, DO_KEYS=keys, DO_VALUES=values, REVERSE=True, USE_STATE_IN=use_dht,
        STORE_STATE_OUT=True, **common)
    # level 2: each segment backwards again from the gradient at its true end
    states_bwd_kernel[(tiles, segments.rows(H))](
        q, do, opt(dz), p, G, segments.summary_k, segments.summary_v, *chunk_out, dummy, dummy, dummy,
        cu, offsets, seg_table, T, segments.chunks, SEGMENTED=True, USE_FINAL_STATE_GRADIENT=True,
        STORE_CHUNKS=True, STORE_INITIAL=False, STORE_DECAY=False, **walk)
    return dhk_chunks, dhv_chunks, dhk_scales, dhv_scales


def chunk_gsa_bwd(q, k, v, s, g, do, dhk_final, dhv_final, scores, hk_chunks, hv_chunks, hv_scales, hk0, hv0,
                  layout: ChunkLayout, scale: float, segment_chunks: int = 0):
    """The backward launches: (dq, dk, dv, ds, dg) in the inputs' dtypes and the float32 initial-state
    gradients (dhk0, dhv0), written whether or not there were initial states. dhk_final / dhv_final:
    float32 contiguous final-state gradients, or both None.

    Checkpoint level 2: segment_chunks L > 0 and hk_chunks, hv_chunks segment_starts' states at the
    start of every L-chunk segment, the chunk states rebuilt from them (chunk_states_from_starts); or
    hk_chunks, hv_chunks None, the forward walk run again from hk0, hv0 (None: zeros). The backward
    then keeps its peak memory low: the keys' side runs
    first, from its own reverse walk, and its states and their gradients are freed before the values'
    reverse walk, so at most three of the four [chunks, H, K, M]-sized tensors live at once. For half
    inputs the rebuilt states and every state gradient are scaled float16 (kernels/states.py
    `_store_scaled`): the tf32 dots that read them keep no more bits. float32 inputs keep float32
    states (their dots are IEEE).
    Levels 0 and 1: hk_chunks, hv_chunks every chunk state as chunk_gsa_train_fwd kept them, Hv of half
    inputs scaled float16 with hv_scales (else hv_scales None)."""
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]
    group = HQ // H
    N, BT, BM = layout.N, layout.BT, pow2_at_least(M)
    prec = dot_precision(q.dtype)
    cu, offsets, table = layout.ptrs(q)
    f32 = dict(dtype=torch.float32, device=q.device)
    compact = q.dtype != torch.float32
    dummy = q
    opt = lambda x: dummy if x is None else x   # noqa: E731

    G = chunk_gates(g, layout)
    recomputed = hk_chunks is None or segment_chunks > 0
    rebuilt = COMPACT_STATES if compact else FLOAT32_STATES
    hk_scales = None
    if segment_chunks:
        hk_chunks, hv_chunks, hk_scales, hv_scales = chunk_states_from_starts(
            k, v, s, G, hk_chunks, hv_chunks, layout, segment_chunks, compact=rebuilt)
    elif recomputed:
        hk_chunks, hv_chunks, hk_scales, hv_scales, *_ = chunk_states_fwd(k, v, s, G, hk0, hv0, layout,
                                                                          compact=rebuilt)
    # which states the chunk kernels read as scaled float16: Hv wherever the inputs are half (the
    # forward's and the rebuilt alike), Hk only where rebuilt
    keys_compact, values_compact = recomputed and compact, compact
    if values_compact and hv_scales is None:
        raise ValueError("chunk_gsa_bwd: half inputs' saved Hv chunk states need their scales (hv_scales)")
    p = torch.empty(B, T, HQ, M, **f32)
    dz = torch.empty(B, T, HQ, M, **f32)
    dG_loc = torch.empty(B, T, HQ, M, **f32)
    sizes = dict(K=K, V=V, M=M, dtype=q.dtype, BT=BT, tokens=B * T * HQ, seqs=N * HQ)
    cfg = launch_config("chunk_bwd_dscores", **sizes)
    chunk_bwd_dscores_kernel[(layout.num_slots, HQ)](
        v, s, G, do, hv_chunks, opt(hv_scales), scores, p, dz, dG_loc, cu, table, scale, T,
        H=H, V=V, M=M, BT=BT, BM=BM, BV=cfg["BV"],
        IS_VARLEN=layout.is_varlen, PREC=prec, STATES_COMPACT=values_compact, GROUP=group, **_warps(cfg))

    dhk0 = torch.empty(N, H, K, M, **f32)
    dhv0 = torch.empty(N, H, M, V, **f32)
    walk = dict(layout=layout, compact=compact)
    if recomputed:
        dhk_chunks, _, dhk_scales, _ = chunk_states_bwd(q, do, dz, p, G, dhk_final, dhv_final, dhk0, dhv0,
                                                        values=False, **walk)
    else:
        dhk_chunks, dhv_chunks, dhk_scales, dhv_scales = chunk_states_bwd(
            q, do, dz, p, G, dhk_final, dhv_final, dhk0, dhv0, **walk)

    # a group's gradients of k, v, s, g: float32 shares per query head, summed at the end
    shares = (lambda x: torch.empty(B, T, HQ, x.shape[-1], **f32)) if group > 1 else torch.empty_like
    dq, dk = torch.empty_like(q), shares(k)
    ds_keys = torch.empty(B, T, HQ, M, **f32)
    carry_keys = torch.empty(layout.num_slots, HQ, M, **f32)
    cfg = launch_config("chunk_bwd_keys", **sizes)
    chunk_bwd_keys_kernel[(layout.num_slots, HQ)](
        q, k, s, G, hk_chunks, dhk_chunks, opt(hk_scales), opt(dhk_scales), dz, dq, dk, ds_keys, carry_keys,
        cu, table, T, H=H, K=K, M=M, BT=BT, BM=BM, BK=cfg["BK"], IS_VARLEN=layout.is_varlen, PREC=prec,
        STATES_COMPACT=keys_compact, DSTATES_COMPACT=compact, GROUP=group, **_warps(cfg))
    del hk_chunks, hk_scales, dhk_chunks, dhk_scales, dz   # the keys' side is done: free it
    if recomputed:
        _, dhv_chunks, _, dhv_scales = chunk_states_bwd(q, do, None, p, G, dhk_final, dhv_final, dhk0, dhv0,
                                                        keys=False, **walk)

    dv, ds, dg = shares(v), shares(s), shares(g)
    cfg = launch_config("chunk_bwd_values", **sizes)
    chunk_bwd_values_kernel[(layout.num_slots, HQ)](
        v, s, G, do, hv_chunks, dhv_chunks, opt(hv_scales), opt(dhv_scales), p, dG_loc, ds_keys, carry_keys,
        dv, ds, dg, cu, table, T, H=H, V=V, M=M, BT=BT, BM=BM, BV=cfg["BV"], USE_INITIAL_STATE=hk0 is not None,
        IS_VARLEN=layout.is_varlen, PREC=prec, STATES_COMPACT=values_compact, DSTATES_COMPACT=compact,
        GROUP=group, **_warps(cfg))
    if group > 1:
        dk, dv, ds, dg = (share.view(B, T, H, group, -1).sum(3).to(x.dtype)
                          for share, x in ((dk, k), (dv, v), (ds, s), (dg, g)))
    return dq, dk, dv, ds, dg, dhk0, dhv0
