"""The two slot memories at every chunk boundary, forward (hk, hv) and backward (dhk, dhv), in one launch each.

Neither memory depends on the slot softmax: Hk depends on (k, s, g) and Hv on (s, v, g). So one
launch builds both, each program walking its sequence's chunks in order. Who owns what is the config
choice SPLIT:
- SPLIT = 0 (paired): program `tile` owns row tile [BK, BM] number `tile` of Hk and column tile
  [BM, BV] number `tile` of Hv (either may be past its dim: then it is masked off), sharing the G and
  s loads of each chunk. Best with many sequence-heads (shape a: 0.29 ms against 0.37 split).
- SPLIT = 1: programs 0 .. NK-1 own one Hk row tile each, the next NV one Hv column tile each. Twice
  the programs, for few long sequences that would leave SMs idle (shape c: 0.49 ms against 0.64).
With w = s * exp(Gend - G):

    Hk' = Hk * exp(Gend)[None, :] + k^T w          Hv' = exp(Gend)[:, None] * Hv + w^T v

The backward walks the chunks in reverse with the adjoint recurrences (dz = d loss / d unscaled
scores, p the slot softmax, do the output gradient):

    dHk = dHk' * exp(Gend)[None, :] + q^T (dz * exp(G))      dHv = exp(Gend)[:, None] * dHv' + (p * exp(G))^T do

With grouped query heads (GROUP query heads per kv head) the walks run per kv head; the backward's
q^T (dz * exp(G)) and (p * exp(G))^T do sum over the group's query heads, which one dot does over
the group's rows stacked (`_group_tile`: BT * GP rows, GP the power of two >= GROUP).

States are float32 throughout: the slot scores feed a softmax, which turns any relative error of
Hk into an absolute error of the probabilities. For half inputs the walks' dots take the 16-bit
tile as it is and split the float32 one into two 16-bit halves (dots.py `dot_acc`): the
states come out ~2e-6 from float64 where tf32 dots left them ~4e-4 off, and the step is shorter.
"""
import triton
import triton.language as tl

from gsa_kernels.kernels.dots import dot_acc, pow2_scale
from gsa_kernels.kernels.indexing import walk_span
from gsa_kernels.kernels.intra import load_gates, load_rows


@triton.jit
def chunk_gates(G, t0, nvalid, h, H: tl.constexpr, M, BT: tl.constexpr, BM: tl.constexpr):
    """This chunk's G [BT, BM] (flat past the sequence end) and Gend, its last valid row [BM]."""
    G_chunk = load_gates(G + (t0 * H + h) * M, tl.arange(0, BT), H * M, nvalid, M, BM)
    return G_chunk, _gate_end(G, t0, nvalid, h, H, M, BM, BT)


@triton.jit
def _prefetch_tile(x, t0, nvalid, h, cols, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """Columns `cols` of the chunk's rows of x [*, H, D] in the input dtype (rows >= nvalid read 0: a
    chunk past the sequence reads nothing). Loaded a chunk ahead and converted where used: a
    conversion here would wait for the load at once."""
    t = tl.arange(0, BT)
    return tl.load(x + (t0 * H + h) * D + t[:, None] * (H * D) + cols[None, :],
                   mask=(t < nvalid)[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def _group_tile(x, t0, nvalid, h, cols, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                GROUP: tl.constexpr, GP: tl.constexpr):
    """Columns `cols` of the chunk's rows of x [*, H * GROUP, D] for the GROUP query heads of kv head h,
    stacked [BT * GP, len(cols)]: row t * GP + j is token t of query head h * GROUP + j (rows of
    j >= GROUP and of tokens >= nvalid read 0). In the input dtype, like `_prefetch_tile`, which it is
    for GROUP = 1."""
    if GP == 1:
        return _prefetch_tile(x, t0, nvalid, h, cols, H, D, BT)
    HQ: tl.constexpr = H * GROUP
    r = tl.arange(0, BT * GP)
    t, j = r // GP, r % GP
    return tl.load(x + (t0 * HQ + h * GROUP) * D + (t * HQ + j)[:, None] * D + cols[None, :],
                   mask=((t < nvalid) & (j < GROUP))[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def _gate_end(G, t0, nvalid, h, H: tl.constexpr, M, BM: tl.constexpr, BT: tl.constexpr):
    """Gend, the chunk's last valid row of G [BM] (zeros for a chunk with no valid rows)."""
    m = tl.arange(0, BM)
    last = tl.maximum(tl.minimum(nvalid, BT) - 1, 0)
    # one integer bound for the mask (M, or 0 for a chunk past the end): Triton 3.9's interpreter
    # rejects a vector mask and-ed with a scalar condition (also `_store_log_decay`)
    return tl.load(G + ((t0 + last) * H + h) * M + m, mask=m < tl.where(nvalid > 0, M, 0), other=0.0)


@triton.jit
def _store_scaled(x, values, scales, off, mask, scale_off, scale_mask):
    """x [R, C] float32 stored as float16 x / scale, one power-of-two scale per row (the exponent of
    the row's largest magnitude, so values lie in (-2, 2)). float16 keeps 11 significant bits of every element
    within 2^-14 of its row's largest: as many as the tf32 dots that read the states keep of float32,
    at half the bytes. The scale only bounds the row, so slots of any magnitude may share it."""
    scale, inverse = pow2_scale(tl.max(tl.abs(x), axis=1))
    tl.store(values + off, (x * inverse[:, None]).to(tl.float16), mask=mask)
    tl.store(scales + scale_off, scale, mask=scale_mask)


@triton.jit
def load_state(values, scales, off, mask, scale_off, scale_mask, PER_ROW: tl.constexpr, COMPACT: tl.constexpr):
    """A tile of chunk states (or their gradients) as float32: as stored, or COMPACT (`_store_scaled`)
    float16 values times their scales, one per row of the tile (PER_ROW: Hk's [BK, BM] tiles) or one
    per column (Hv's [BM, BV] tiles). The product is exact and within the 11 significant bits the
    tf32 dots that read it keep, so a compact state loses nothing they would use."""
    x = tl.load(values + off, mask=mask, other=0.0).to(tl.float32)
    if COMPACT:
        scale = tl.load(scales + scale_off, mask=scale_mask, other=0.0)
        if PER_ROW:
            x = x * scale[:, None]
        else:
            x = x * scale[None, :]
    return x


@triton.jit
def _store_chunk(hk, hv, hk_chunks, hv_chunks, hk_scales, hv_scales, slot_head, hk_off, hk_mask, hv_off, hv_mask,
                 kk, vv, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, DO_KEYS: tl.constexpr,
                 DO_VALUES: tl.constexpr, COMPACT: tl.constexpr):
    """A walk's tiles at state index slot_head (a chunk slot's slot * H + h, or a walk row's): float32,
    or COMPACT scaled float16 with their scales (`_store_scaled`). Used for the states and for their
    gradients alike."""
    if COMPACT:
        if DO_KEYS:
            _store_scaled(hk, hk_chunks, hk_scales, slot_head * K * M + hk_off, hk_mask, slot_head * K + kk, kk < K)
        if DO_VALUES:
            _store_scaled(hv, hv_chunks, hv_scales, slot_head * M * V + hv_off, hv_mask, slot_head * V + vv, vv < V)
    else:
        if DO_KEYS:
            tl.store(hk_chunks + slot_head * K * M + hk_off, hk, mask=hk_mask)
        if DO_VALUES:
            tl.store(hv_chunks + slot_head * M * V + hv_off, hv, mask=hv_mask)


@triton.jit
def _store_log_decay(seg_decay, index, log_decay, m, M, key_tile, value_tile, DO_KEYS: tl.constexpr):
    """A segment's total log decay [BM]: every tile program of the walk row has the same sum, so the
    row's first one stores it."""
    if DO_KEYS:
        first_tile = key_tile == 0
    else:
        first_tile = value_tile == 0
    tl.store(seg_decay + index.to(tl.int64) * M + m, log_decay, mask=m < tl.where(first_tile, M, 0))


@triton.jit
def _walk_fwd(k, v, s, G_all, hk0, hv0, hk_chunks, hv_chunks, hk_scales, hv_scales, hk_final, hv_final,
              seg_decay, bos, eos, chunk0, num_chunks, index, h, key_tile, value_tile,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BT: tl.constexpr,
              BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DO_KEYS: tl.constexpr,
              DO_VALUES: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_CHUNKS: tl.constexpr,
              STORE_FINAL_STATE: tl.constexpr, STORE_DECAY: tl.constexpr, PREC: tl.constexpr,
              COMPACT_HK: tl.constexpr, COMPACT_HV: tl.constexpr):
    """Walk Hk row tile `key_tile` (if DO_KEYS) and Hv column tile `value_tile` (if DO_VALUES) of head h
    over num_chunks chunks from token bos (eos: where the sequence ends), from hk0 / hv0[index] if
    USE_INITIAL_STATE (else zeros), storing the state at each chunk start in chunk slots chunk0, ... if
    STORE_CHUNKS, the state after the last chunk in hk_final / hv_final[index] if STORE_FINAL_STATE
    and the walk's total log decay (the sum of its chunks' Gend) in seg_decay[index] if STORE_DECAY.
    COMPACT_HK / COMPACT_HV: Hk's / Hv's chunk states go out as scaled float16 (`_store_scaled`), Hk
    with one scale per row k, Hv with one per column v; the values walk then carries Hv transposed,
    [BV, BM], so that its scale is a reduction within a row like Hk's."""
    m = tl.arange(0, BM)
    t = tl.arange(0, BT)
    kk = key_tile * BK + tl.arange(0, BK)
    vv = value_tile * BV + tl.arange(0, BV)
    hk_mask = (kk < K)[:, None] & (m < M)[None, :]
    hv_mask = (m < M)[:, None] & (vv < V)[None, :]
    hk_off = kk[:, None] * M + m[None, :]
    hv_off = m[:, None] * V + vv[None, :]
    if COMPACT_HV:     # Hv carried transposed: [BV, BM]
        hv_mask = (vv < V)[:, None] & (m < M)[None, :]
        hv_off = m[None, :] * V + vv[:, None]
    # hk, hv hold the states at the start of chunk c (a memory this program does not own stays
    # unused and is compiled away)
    hk = tl.zeros((BK, BM), dtype=tl.float32)
    if COMPACT_HV:
        hv = tl.zeros((BV, BM), dtype=tl.float32)
    else:
        hv = tl.zeros((BM, BV), dtype=tl.float32)
    if USE_INITIAL_STATE:
        if DO_KEYS:
            hk += tl.load(hk0 + index.to(tl.int64) * K * M + hk_off, mask=hk_mask, other=0.0)
        if DO_VALUES:
            hv += tl.load(hv0 + index.to(tl.int64) * M * V + hv_off, mask=hv_mask, other=0.0)
    log_decay = tl.zeros((BM,), dtype=tl.float32)
    # Software prefetch: the walk's only serial dependence is the state, yet Triton's
    # pipeliner issues the k / v tile at the end of the previous step and reloads Gend unpipelined,
    # which left ~1 us of memory latency in each step. So the k / v tiles and Gend of chunk c + 1
    # are loaded by hand at the top of step c; G and s go through the pipeliner's async copies
    # (num_stages 3 keeps them two steps ahead).
    if DO_KEYS:
        kc = _prefetch_tile(k, bos, eos - bos, h, kk, H, K, BT)
    if DO_VALUES:
        vc = _prefetch_tile(v, bos, eos - bos, h, vv, H, V, BT)
    Gend = _gate_end(G_all, bos, eos - bos, h, H, M, BM, BT)
    for c in range(num_chunks):
        t0 = bos + c * BT
        nvalid = eos - t0
        slot = chunk0 + c
        if DO_KEYS:
            kc_next = _prefetch_tile(k, t0 + BT, nvalid - BT, h, kk, H, K, BT)
        if DO_VALUES:
            vc_next = _prefetch_tile(v, t0 + BT, nvalid - BT, h, vv, H, V, BT)
        Gend_next = _gate_end(G_all, t0 + BT, nvalid - BT, h, H, M, BM, BT)
        if STORE_CHUNKS:
            if DO_KEYS:
                _store_chunk(hk, hv, hk_chunks, hv_chunks, hk_scales, hv_scales, slot * H + h, hk_off, hk_mask,
                             hv_off, hv_mask, kk, vv, K, V, M, True, False, COMPACT_HK)
            if DO_VALUES:
                _store_chunk(hk, hv, hk_chunks, hv_chunks, hk_scales, hv_scales, slot * H + h, hk_off, hk_mask,
                             hv_off, hv_mask, kk, vv, K, V, M, False, True, COMPACT_HV)
        G = load_gates(G_all + (t0 * H + h) * M, t, H * M, nvalid, M, BM)
        sc = load_rows(s + (t0 * H + h) * M, t, H * M, nvalid, M, BM)
        w = sc * tl.exp(Gend[None, :] - G)
        decay = tl.exp(Gend)
        if DO_KEYS:
            hk = dot_acc(tl.trans(kc), w, hk * decay[None, :], PREC)
            kc = kc_next
        if DO_VALUES:
            if COMPACT_HV:
                hv = dot_acc(tl.trans(vc), w, hv * decay[None, :], PREC)
            else:
                hv = dot_acc(tl.trans(w), vc, decay[:, None] * hv, PREC)
            vc = vc_next
        if STORE_DECAY:
            log_decay += Gend
        Gend = Gend_next
    if STORE_FINAL_STATE:     # float32 (the op's final states, or a segment's summary)
        _store_chunk(hk, hv, hk_final, hv_final, hk_final, hv_final, index.to(tl.int64), hk_off, hk_mask,
                     hv_off, hv_mask, kk, vv, K, V, M, DO_KEYS, DO_VALUES, False)
    if STORE_DECAY:
        _store_log_decay(seg_decay, index, log_decay, m, M, key_tile, value_tile, DO_KEYS)


@triton.jit
def states_fwd_kernel(k, v, s, G_all, hk0, hv0, hk_chunks, hv_chunks, hk_scales, hv_scales, hk_final, hv_final,
                      seg_decay, cu_seqlens, chunk_offsets, segment_table, T, segment_chunks,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                      BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      SPLIT: tl.constexpr, SEGMENTED: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                      STORE_CHUNKS: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, STORE_DECAY: tl.constexpr,
                      IS_VARLEN: tl.constexpr, PREC: tl.constexpr, COMPACT_HK: tl.constexpr,
                      COMPACT_HV: tl.constexpr):
    """Grid (NK + NV if SPLIT else max(NK, NV), rows): tile programs x walk rows, a row being a
    sequence-head (n * H + h), or with SEGMENTED a segment-head (indexing.py `walk_span`; the
    two-level walk, launchers/chunk.py). The state index of hk0 / hk_final / seg_decay is the row.
    COMPACT_HK / COMPACT_HV: Hk's / Hv's chunk states as scaled float16 (values in hk_chunks /
    hv_chunks, float32 scales per row of Hk and per column of Hv in hk_scales [slots, H, K] /
    hv_scales [slots, H, V])."""
    tile, row = tl.program_id(0), tl.program_id(1)
    NK: tl.constexpr = (K + BK - 1) // BK
    bos, eos, chunk0, num_chunks, h = walk_span(cu_seqlens, chunk_offsets, segment_table, row, T, segment_chunks,
                                                H, BT, SEGMENTED, IS_VARLEN)
    if not SPLIT:
        _walk_fwd(k, v, s, G_all, hk0, hv0, hk_chunks, hv_chunks, hk_scales, hv_scales, hk_final, hv_final,
                  seg_decay, bos, eos, chunk0, num_chunks, row, h, tile, tile, H, K, V, M, BT, BM, BK, BV,
                  True, True, USE_INITIAL_STATE, STORE_CHUNKS, STORE_FINAL_STATE, STORE_DECAY, PREC, COMPACT_HK,
                  COMPACT_HV)
    elif tile < NK:
        _walk_fwd(k, v, s, G_all, hk0, hv0, hk_chunks, hv_chunks, hk_scales, hv_scales, hk_final, hv_final,
                  seg_decay, bos, eos, chunk0, num_chunks, row, h, tile, 0, H, K, V, M, BT, BM, BK, BV,
                  True, False, USE_INITIAL_STATE, STORE_CHUNKS, STORE_FINAL_STATE, STORE_DECAY, PREC, COMPACT_HK,
                  COMPACT_HV)
    else:
        _walk_fwd(k, v, s, G_all, hk0, hv0, hk_chunks, hv_chunks, hk_scales, hv_scales, hk_final, hv_final,
                  seg_decay, bos, eos, chunk0, num_chunks, row, h, 0, tile - NK, H, K, V, M, BT, BM, BK, BV,
                  False, True, USE_INITIAL_STATE, STORE_CHUNKS, STORE_FINAL_STATE, STORE_DECAY, PREC, COMPACT_HK,
                  COMPACT_HV)


@triton.jit
def _walk_bwd(q, do, dz, p_all, G_all, dhk_final, dhv_final, dhk_chunks, dhv_chunks, dhk_scales, dhv_scales,
              dhk0, dhv0, seg_decay, bos, eos, chunk0, num_chunks, index, h, key_tile, value_tile,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BT: tl.constexpr,
              BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DO_KEYS: tl.constexpr,
              DO_VALUES: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr, STORE_CHUNKS: tl.constexpr,
              STORE_INITIAL: tl.constexpr, STORE_DECAY: tl.constexpr, PREC: tl.constexpr,
              COMPACT: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr):
    """Walk dHk row tile `key_tile` (if DO_KEYS) and dHv column tile `value_tile` (if DO_VALUES) of head
    h backwards over num_chunks chunks from token bos (eos: where the sequence ends), from
    dhk_final / dhv_final[index] if USE_FINAL_STATE_GRADIENT (else zeros); with STORE_CHUNKS,
    dhk_chunks[c] / dhv_chunks[c] get the gradient w.r.t. the state at the END of chunk c; with
    STORE_INITIAL, dhk0 / dhv0[index] get the gradient at the walk's start, and with STORE_DECAY
    seg_decay[index] the walk's total log decay, as `_walk_fwd`.
    COMPACT: the chunk gradients go out as scaled float16, as the forward walk's (dHv carried transposed).
    q, do, dz and p are those of the GROUP query heads of kv head h, read as stacked rows (`_group_tile`)."""
    m = tl.arange(0, BM)
    rows = tl.arange(0, BT * GP) // GP      # the token of each stacked row
    kk = key_tile * BK + tl.arange(0, BK)
    vv = value_tile * BV + tl.arange(0, BV)
    hk_mask = (kk < K)[:, None] & (m < M)[None, :]
    hv_mask = (m < M)[:, None] & (vv < V)[None, :]
    hk_off = kk[:, None] * M + m[None, :]
    hv_off = m[:, None] * V + vv[None, :]
    dhk = tl.zeros((BK, BM), dtype=tl.float32)
    if COMPACT:     # dHv carried transposed: [BV, BM]
        hv_mask = (vv < V)[:, None] & (m < M)[None, :]
        hv_off = m[None, :] * V + vv[:, None]
        dhv = tl.zeros((BV, BM), dtype=tl.float32)
    else:
        dhv = tl.zeros((BM, BV), dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        if DO_KEYS:
            dhk += tl.load(dhk_final + index.to(tl.int64) * K * M + hk_off, mask=hk_mask, other=0.0)
        if DO_VALUES:
            dhv += tl.load(dhv_final + index.to(tl.int64) * M * V + hv_off, mask=hv_mask, other=0.0)
    log_decay = tl.zeros((BM,), dtype=tl.float32)
    # Software prefetch of the q / do tiles and Gend one chunk ahead, as in the forward walk (a walk
    # of no chunks reads nothing).
    t0 = bos + tl.maximum(num_chunks - 1, 0) * BT
    nvalid_last = tl.where(num_chunks > 0, eos - t0, 0)
    if DO_KEYS:
        qc = _group_tile(q, t0, nvalid_last, h, kk, H, K, BT, GROUP, GP)
    if DO_VALUES:
        doc = _group_tile(do, t0, nvalid_last, h, vv, H, V, BT, GROUP, GP)
    Gend = _gate_end(G_all, t0, nvalid_last, h, H, M, BM, BT)
    for i in range(num_chunks):
        c = num_chunks - 1 - i
        t0 = bos + c * BT
        nvalid = eos - t0
        slot = chunk0 + c
        # the chunk before this one; before the first chunk nothing (nvalid 0: all masked)
        t0_prev = tl.maximum(t0 - BT, bos)
        nvalid_prev = tl.where(c > 0, eos - t0_prev, 0)
        if DO_KEYS:
            qc_next = _group_tile(q, t0_prev, nvalid_prev, h, kk, H, K, BT, GROUP, GP)
        if DO_VALUES:
            doc_next = _group_tile(do, t0_prev, nvalid_prev, h, vv, H, V, BT, GROUP, GP)
        Gend_next = _gate_end(G_all, t0_prev, nvalid_prev, h, H, M, BM, BT)
        if STORE_CHUNKS:
            _store_chunk(dhk, dhv, dhk_chunks, dhv_chunks, dhk_scales, dhv_scales, slot * H + h, hk_off, hk_mask,
                         hv_off, hv_mask, kk, vv, K, V, M, DO_KEYS, DO_VALUES, COMPACT)
        eG = tl.exp(load_gates(G_all + (t0 * H + h) * M, rows, H * M, nvalid, M, BM))
        decay = tl.exp(Gend)
        if DO_KEYS:
            dzc = _group_tile(dz, t0, nvalid, h, m, H, M, BT, GROUP, GP)
            # dz e^G is a gradient, unbounded under float16 loss scaling: float16 halves of it could
            # overflow, so for float16 inputs this dot keeps float32 operands (bf16 has float32's range)
            qk = qc
            if qc.dtype == tl.float16:
                qk = qc.to(tl.float32)
            dhk = dot_acc(tl.trans(qk), dzc * eG, dhk * decay[None, :], PREC)
            qc = qc_next
        if DO_VALUES:
            pe = _group_tile(p_all, t0, nvalid, h, m, H, M, BT, GROUP, GP) * eG
            if COMPACT:
                dhv = dot_acc(tl.trans(doc), pe, dhv * decay[None, :], PREC)
            else:
                dhv = dot_acc(tl.trans(pe), doc, decay[:, None] * dhv, PREC)
            doc = doc_next
        if STORE_DECAY:
            log_decay += Gend
        Gend = Gend_next
    if STORE_INITIAL:     # float32 (the initial-state gradients, or a segment's summary)
        _store_chunk(dhk, dhv, dhk0, dhv0, dhk0, dhv0, index.to(tl.int64), hk_off, hk_mask,
                     hv_off, hv_mask, kk, vv, K, V, M, DO_KEYS, DO_VALUES, False)
    if STORE_DECAY:
        _store_log_decay(seg_decay, index, log_decay, m, M, key_tile, value_tile, DO_KEYS)


@triton.jit
def states_bwd_kernel(q, do, dz, p_all, G_all, dhk_final, dhv_final, dhk_chunks, dhv_chunks, dhk_scales, dhv_scales,
                      dhk0, dhv0, seg_decay, cu_seqlens, chunk_offsets, segment_table, T, segment_chunks,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                      BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      SPLIT: tl.constexpr, DO_KEYS: tl.constexpr, DO_VALUES: tl.constexpr, SEGMENTED: tl.constexpr,
                      USE_FINAL_STATE_GRADIENT: tl.constexpr, STORE_CHUNKS: tl.constexpr,
                      STORE_INITIAL: tl.constexpr, STORE_DECAY: tl.constexpr, IS_VARLEN: tl.constexpr,
                      PREC: tl.constexpr, COMPACT: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr):
    """Grid, walk rows and owned tiles as in states_fwd_kernel when the launch walks both memories; a
    launch of one (DO_KEYS or DO_VALUES alone: the backward of checkpoint level 2, which frees one
    side's states before it builds the other's gradients) has one program per tile of that memory.
    COMPACT: the chunk gradients as scaled float16 with float32 scales per row of dHk and per column
    of dHv (dhk_scales [slots, H, K], dhv_scales [slots, H, V]). Rows are per kv head (H); q, do, dz
    and p have H * GROUP heads (GP: the power of two >= GROUP)."""
    tile, row = tl.program_id(0), tl.program_id(1)
    NK: tl.constexpr = (K + BK - 1) // BK
    bos, eos, chunk0, num_chunks, h = walk_span(cu_seqlens, chunk_offsets, segment_table, row, T, segment_chunks,
                                                H, BT, SEGMENTED, IS_VARLEN)
    if not DO_VALUES:
        _walk_bwd(q, do, dz, p_all, G_all, dhk_final, dhv_final, dhk_chunks, dhv_chunks, dhk_scales, dhv_scales,
                  dhk0, dhv0, seg_decay, bos, eos, chunk0, num_chunks, row, h, tile, 0,
                  H, K, V, M, BT, BM, BK, BV, True, False, USE_FINAL_STATE_GRADIENT, STORE_CHUNKS, STORE_INITIAL,
                  STORE_DECAY, PREC, COMPACT, GROUP, GP)
    elif not DO_KEYS:
        _walk_bwd(q, do, dz, p_all, G_all, dhk_final, dhv_final, dhk_chunks, dhv_chunks, dhk_scales, dhv_scales,
                  dhk0, dhv0, seg_decay, bos, eos, chunk0, num_chunks, row, h, 0, tile,
                  H, K, V, M, BT, BM, BK, BV, False, True, USE_FINAL_STATE_GRADIENT, STORE_CHUNKS, STORE_INITIAL,
                  STORE_DECAY, PREC, COMPACT, GROUP, GP)
    elif not SPLIT:
        _walk_bwd(q, do, dz, p_all, G_all, dhk_final, dhv_final, dhk_chunks, dhv_chunks, dhk_scales, dhv_scales,
                  dhk0, dhv0, seg_decay, bos, eos, chunk0, num_chunks, row, h, tile, tile,
                  H, K, V, M, BT, BM, BK, BV, True, True, USE_FINAL_STATE_GRADIENT, STORE_CHUNKS, STORE_INITIAL,
                  STORE_DECAY, PREC, COMPACT, GROUP, GP)
    elif tile < NK:
        _walk_bwd(q, do, dz, p_all, G_all, dhk_final, dhv_final, dhk_chunks, dhv_chunks, dhk_scales, dhv_scales,
                  dhk0, dhv0, seg_decay, bos, eos, chunk0, num_chunks, row, h, tile, 0,
                  H, K, V, M, BT, BM, BK, BV, True, False, USE_FINAL_STATE_GRADIENT, STORE_CHUNKS, STORE_INITIAL,
                  STORE_DECAY, PREC, COMPACT, GROUP, GP)
    else:
        _walk_bwd(q, do, dz, p_all, G_all, dhk_final, dhv_final, dhk_chunks, dhv_chunks, dhk_scales, dhv_scales,
                  dhk0, dhv0, seg_decay, bos, eos, chunk0, num_chunks, row, h, 0, tile - NK,
                  H, K, V, M, BT, BM, BK, BV, False, True, USE_FINAL_STATE_GRADIENT, STORE_CHUNKS, STORE_INITIAL,
                  STORE_DECAY, PREC, COMPACT, GROUP, GP)
