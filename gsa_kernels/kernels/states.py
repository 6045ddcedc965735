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

States are float32 throughout: the slot scores feed a softmax, which turns any relative error of
Hk into an absolute error of the probabilities.
"""
import triton
import triton.language as tl

from gsa_kernels.kernels.indexing import sequence_span
from gsa_kernels.kernels.intra import load_gates, load_rows


@triton.jit
def chunk_gates(G, t0, nvalid, h, H: tl.constexpr, M, BT: tl.constexpr, BM: tl.constexpr):
    """This chunk's G [BT, BM] (flat past the sequence end) and Gend, its last valid row [BM]."""
    base = G + (t0 * H + h) * M
    m = tl.arange(0, BM)
    last = tl.minimum(nvalid, BT) - 1
    Gend = tl.load(base + last * (H * M) + m, mask=m < M, other=0.0)
    return load_gates(base, tl.arange(0, BT), H * M, nvalid, M, BM), Gend


@triton.jit
def _walk_fwd(k, v, s, G_all, hk0, hv0, hk_chunks, hv_chunks, hk_final, hv_final, cu_seqlens, chunk_offsets,
              T, key_tile, value_tile, nh,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BT: tl.constexpr,
              BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DO_KEYS: tl.constexpr,
              DO_VALUES: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
              IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    """Walk Hk row tile `key_tile` (if DO_KEYS) and Hv column tile `value_tile` (if DO_VALUES)."""
    n, h = nh // H, nh % H
    bos, eos, chunk0 = sequence_span(cu_seqlens, chunk_offsets, n, T, BT, IS_VARLEN)
    m = tl.arange(0, BM)
    t = tl.arange(0, BT)
    kk = key_tile * BK + tl.arange(0, BK)
    vv = value_tile * BV + tl.arange(0, BV)
    hk_mask = (kk < K)[:, None] & (m < M)[None, :]
    hv_mask = (m < M)[:, None] & (vv < V)[None, :]
    hk_off = kk[:, None] * M + m[None, :]
    hv_off = m[:, None] * V + vv[None, :]
    # hk, hv hold the states at the start of chunk c (a memory this program does not own stays
    # unused and is compiled away)
    hk = tl.zeros((BK, BM), dtype=tl.float32)
    hv = tl.zeros((BM, BV), dtype=tl.float32)
    if USE_INITIAL_STATE:
        if DO_KEYS:
            hk += tl.load(hk0 + nh.to(tl.int64) * K * M + hk_off, mask=hk_mask, other=0.0)
        if DO_VALUES:
            hv += tl.load(hv0 + nh.to(tl.int64) * M * V + hv_off, mask=hv_mask, other=0.0)
    for c in range(tl.cdiv(eos - bos, BT)):
        t0 = bos + c * BT
        slot = chunk0 + c
        if DO_KEYS:
            tl.store(hk_chunks + (slot * H + h) * K * M + hk_off, hk, mask=hk_mask)
        if DO_VALUES:
            tl.store(hv_chunks + (slot * H + h) * M * V + hv_off, hv, mask=hv_mask)
        nvalid = eos - t0
        G, Gend = chunk_gates(G_all, t0, nvalid, h, H, M, BT, BM)
        sc = load_rows(s + (t0 * H + h) * M, t, H * M, nvalid, M, BM)
        w = sc * tl.exp(Gend[None, :] - G)
        decay = tl.exp(Gend)
        row_mask = (t < nvalid)[:, None]
        if DO_KEYS:
            kc = tl.load(k + (t0 * H + h) * K + t[:, None] * (H * K) + kk[None, :],
                         mask=row_mask & (kk < K)[None, :], other=0.0).to(tl.float32)
            hk = hk * decay[None, :] + tl.dot(tl.trans(kc), w, input_precision=PREC)
        if DO_VALUES:
            vc = tl.load(v + (t0 * H + h) * V + t[:, None] * (H * V) + vv[None, :],
                         mask=row_mask & (vv < V)[None, :], other=0.0).to(tl.float32)
            hv = decay[:, None] * hv + tl.dot(tl.trans(w), vc, input_precision=PREC)
    if STORE_FINAL_STATE:
        if DO_KEYS:
            tl.store(hk_final + nh.to(tl.int64) * K * M + hk_off, hk, mask=hk_mask)
        if DO_VALUES:
            tl.store(hv_final + nh.to(tl.int64) * M * V + hv_off, hv, mask=hv_mask)


@triton.jit
def states_fwd_kernel(k, v, s, G_all, hk0, hv0, hk_chunks, hv_chunks, hk_final, hv_final,
                      cu_seqlens, chunk_offsets, T,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                      BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      SPLIT: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                      IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    """Grid (walk_programs(K, V, BK, BV, SPLIT), N * H)."""
    tile, nh = tl.program_id(0), tl.program_id(1)
    NK: tl.constexpr = (K + BK - 1) // BK
    if not SPLIT:
        _walk_fwd(k, v, s, G_all, hk0, hv0, hk_chunks, hv_chunks, hk_final, hv_final, cu_seqlens,
                  chunk_offsets, T, tile, tile, nh, H, K, V, M, BT, BM, BK, BV, True, True,
                  USE_INITIAL_STATE, STORE_FINAL_STATE, IS_VARLEN, PREC)
    elif tile < NK:
        _walk_fwd(k, v, s, G_all, hk0, hv0, hk_chunks, hv_chunks, hk_final, hv_final, cu_seqlens,
                  chunk_offsets, T, tile, 0, nh, H, K, V, M, BT, BM, BK, BV, True, False,
                  USE_INITIAL_STATE, STORE_FINAL_STATE, IS_VARLEN, PREC)
    else:
        _walk_fwd(k, v, s, G_all, hk0, hv0, hk_chunks, hv_chunks, hk_final, hv_final, cu_seqlens,
                  chunk_offsets, T, 0, tile - NK, nh, H, K, V, M, BT, BM, BK, BV, False, True,
                  USE_INITIAL_STATE, STORE_FINAL_STATE, IS_VARLEN, PREC)


@triton.jit
def _walk_bwd(q, do, dz, p_all, G_all, dhk_final, dhv_final, dhk_chunks, dhv_chunks, dhk0, dhv0,
              cu_seqlens, chunk_offsets, T, key_tile, value_tile, nh,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BT: tl.constexpr,
              BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DO_KEYS: tl.constexpr,
              DO_VALUES: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
              PREC: tl.constexpr):
    """Walk dHk row tile `key_tile` (if DO_KEYS) and dHv column tile `value_tile` (if DO_VALUES)
    backwards; dhk_chunks[c] / dhv_chunks[c] get the gradient w.r.t. the state at the END of chunk c."""
    n, h = nh // H, nh % H
    bos, eos, chunk0 = sequence_span(cu_seqlens, chunk_offsets, n, T, BT, IS_VARLEN)
    num_chunks = tl.cdiv(eos - bos, BT)
    m = tl.arange(0, BM)
    t = tl.arange(0, BT)
    kk = key_tile * BK + tl.arange(0, BK)
    vv = value_tile * BV + tl.arange(0, BV)
    hk_mask = (kk < K)[:, None] & (m < M)[None, :]
    hv_mask = (m < M)[:, None] & (vv < V)[None, :]
    hk_off = kk[:, None] * M + m[None, :]
    hv_off = m[:, None] * V + vv[None, :]
    dhk = tl.zeros((BK, BM), dtype=tl.float32)
    dhv = tl.zeros((BM, BV), dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        if DO_KEYS:
            dhk += tl.load(dhk_final + nh.to(tl.int64) * K * M + hk_off, mask=hk_mask, other=0.0)
        if DO_VALUES:
            dhv += tl.load(dhv_final + nh.to(tl.int64) * M * V + hv_off, mask=hv_mask, other=0.0)
    for i in range(num_chunks):
        c = num_chunks - 1 - i
        t0 = bos + c * BT
        slot = chunk0 + c
        if DO_KEYS:
            tl.store(dhk_chunks + (slot * H + h) * K * M + hk_off, dhk, mask=hk_mask)
        if DO_VALUES:
            tl.store(dhv_chunks + (slot * H + h) * M * V + hv_off, dhv, mask=hv_mask)
        nvalid = eos - t0
        G, Gend = chunk_gates(G_all, t0, nvalid, h, H, M, BT, BM)
        eG = tl.exp(G)
        decay = tl.exp(Gend)
        row_mask = (t < nvalid)[:, None]
        if DO_KEYS:
            dzc = load_rows(dz + (t0 * H + h) * M, t, H * M, nvalid, M, BM)
            qc = tl.load(q + (t0 * H + h) * K + t[:, None] * (H * K) + kk[None, :],
                         mask=row_mask & (kk < K)[None, :], other=0.0).to(tl.float32)
            dhk = dhk * decay[None, :] + tl.dot(tl.trans(qc), dzc * eG, input_precision=PREC)
        if DO_VALUES:
            p = load_rows(p_all + (t0 * H + h) * M, t, H * M, nvalid, M, BM)
            doc = tl.load(do + (t0 * H + h) * V + t[:, None] * (H * V) + vv[None, :],
                          mask=row_mask & (vv < V)[None, :], other=0.0).to(tl.float32)
            dhv = decay[:, None] * dhv + tl.dot(tl.trans(p * eG), doc, input_precision=PREC)
    if DO_KEYS:
        tl.store(dhk0 + nh.to(tl.int64) * K * M + hk_off, dhk, mask=hk_mask)
    if DO_VALUES:
        tl.store(dhv0 + nh.to(tl.int64) * M * V + hv_off, dhv, mask=hv_mask)


@triton.jit
def states_bwd_kernel(q, do, dz, p_all, G_all, dhk_final, dhv_final, dhk_chunks, dhv_chunks, dhk0, dhv0,
                      cu_seqlens, chunk_offsets, T,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                      BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      SPLIT: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
                      PREC: tl.constexpr):
    """Grid (walk_programs(K, V, BK, BV, SPLIT), N * H), owned tiles as in states_fwd_kernel."""
    tile, nh = tl.program_id(0), tl.program_id(1)
    NK: tl.constexpr = (K + BK - 1) // BK
    if not SPLIT:
        _walk_bwd(q, do, dz, p_all, G_all, dhk_final, dhv_final, dhk_chunks, dhv_chunks, dhk0, dhv0,
                  cu_seqlens, chunk_offsets, T, tile, tile, nh, H, K, V, M, BT, BM, BK, BV, True, True,
                  USE_FINAL_STATE_GRADIENT, IS_VARLEN, PREC)
    elif tile < NK:
        _walk_bwd(q, do, dz, p_all, G_all, dhk_final, dhv_final, dhk_chunks, dhv_chunks, dhk0, dhv0,
                  cu_seqlens, chunk_offsets, T, tile, 0, nh, H, K, V, M, BT, BM, BK, BV, True, False,
                  USE_FINAL_STATE_GRADIENT, IS_VARLEN, PREC)
    else:
        _walk_bwd(q, do, dz, p_all, G_all, dhk_final, dhv_final, dhk_chunks, dhv_chunks, dhk0, dhv0,
                  cu_seqlens, chunk_offsets, T, 0, tile - NK, nh, H, K, V, M, BT, BM, BK, BV, False, True,
                  USE_FINAL_STATE_GRADIENT, IS_VARLEN, PREC)
