"""The two slot memories at every chunk boundary, forward (hk, hv) and backward (dhk, dhv), in one launch each.

Neither memory depends on the slot softmax: Hk depends on (k, s, g) and Hv on (s, v, g). So one
launch builds both, with one program per row tile [BK, BM] of Hk and one per column tile [BM, BV]
of Hv, each walking its sequence's chunks in order. (Owning an Hk and an Hv tile per program shared
the G and s loads, but left 128 programs on 132 SMs for 8 long sequence-heads: shape c's forward
spent 0.64 of its 0.99 ms in this walk.) With w = s * exp(Gend - G):

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
def states_fwd_kernel(k, v, s, G_all, hk0, hv0, hk_chunks, hv_chunks, hk_final, hv_final,
                      cu_seqlens, chunk_offsets, T,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                      BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                      IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    """Programs 0 .. NK-1 walk the Hk row tiles, NK .. NK+NV-1 the Hv column tiles: one memory per
    program, so a sequence-head gets NK + NV programs of one dot per step (few long sequences
    otherwise leave the SMs short of programs)."""
    tile, nh = tl.program_id(0), tl.program_id(1)
    NK: tl.constexpr = (K + BK - 1) // BK
    if tile < NK:
        _walk_keys_fwd(k, s, G_all, hk0, hk_chunks, hk_final, cu_seqlens, chunk_offsets, T, tile, nh,
                       H, K, M, BT, BM, BK, USE_INITIAL_STATE, STORE_FINAL_STATE, IS_VARLEN, PREC)
    else:
        _walk_values_fwd(v, s, G_all, hv0, hv_chunks, hv_final, cu_seqlens, chunk_offsets, T, tile - NK, nh,
                         H, V, M, BT, BM, BV, USE_INITIAL_STATE, STORE_FINAL_STATE, IS_VARLEN, PREC)


@triton.jit
def _walk_keys_fwd(k, s, G_all, hk0, hk_chunks, hk_final, cu_seqlens, chunk_offsets, T, tile, nh,
                   H: tl.constexpr, K: tl.constexpr, M: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
                   BK: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                   IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    n, h = nh // H, nh % H
    bos, eos, chunk0 = sequence_span(cu_seqlens, chunk_offsets, n, T, BT, IS_VARLEN)
    m = tl.arange(0, BM)
    t = tl.arange(0, BT)
    kk = tile * BK + tl.arange(0, BK)
    hk_mask = (kk < K)[:, None] & (m < M)[None, :]
    hk_off = kk[:, None] * M + m[None, :]
    # hk holds the state at the start of chunk c
    hk = tl.zeros((BK, BM), dtype=tl.float32)
    if USE_INITIAL_STATE:
        hk += tl.load(hk0 + nh.to(tl.int64) * K * M + hk_off, mask=hk_mask, other=0.0)
    for c in range(tl.cdiv(eos - bos, BT)):
        t0 = bos + c * BT
        slot = chunk0 + c
        tl.store(hk_chunks + (slot * H + h) * K * M + hk_off, hk, mask=hk_mask)
        nvalid = eos - t0
        G, Gend = chunk_gates(G_all, t0, nvalid, h, H, M, BT, BM)
        sc = load_rows(s + (t0 * H + h) * M, t, H * M, nvalid, M, BM)
        w = sc * tl.exp(Gend[None, :] - G)
        kc = tl.load(k + (t0 * H + h) * K + t[:, None] * (H * K) + kk[None, :],
                     mask=(t < nvalid)[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
        hk = hk * tl.exp(Gend)[None, :] + tl.dot(tl.trans(kc), w, input_precision=PREC)
    if STORE_FINAL_STATE:
        tl.store(hk_final + nh.to(tl.int64) * K * M + hk_off, hk, mask=hk_mask)


@triton.jit
def _walk_values_fwd(v, s, G_all, hv0, hv_chunks, hv_final, cu_seqlens, chunk_offsets, T, tile, nh,
                     H: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
                     BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                     IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    n, h = nh // H, nh % H
    bos, eos, chunk0 = sequence_span(cu_seqlens, chunk_offsets, n, T, BT, IS_VARLEN)
    m = tl.arange(0, BM)
    t = tl.arange(0, BT)
    vv = tile * BV + tl.arange(0, BV)
    hv_mask = (m < M)[:, None] & (vv < V)[None, :]
    hv_off = m[:, None] * V + vv[None, :]
    hv = tl.zeros((BM, BV), dtype=tl.float32)
    if USE_INITIAL_STATE:
        hv += tl.load(hv0 + nh.to(tl.int64) * M * V + hv_off, mask=hv_mask, other=0.0)
    for c in range(tl.cdiv(eos - bos, BT)):
        t0 = bos + c * BT
        slot = chunk0 + c
        tl.store(hv_chunks + (slot * H + h) * M * V + hv_off, hv, mask=hv_mask)
        nvalid = eos - t0
        G, Gend = chunk_gates(G_all, t0, nvalid, h, H, M, BT, BM)
        sc = load_rows(s + (t0 * H + h) * M, t, H * M, nvalid, M, BM)
        w = sc * tl.exp(Gend[None, :] - G)
        vc = tl.load(v + (t0 * H + h) * V + t[:, None] * (H * V) + vv[None, :],
                     mask=(t < nvalid)[:, None] & (vv < V)[None, :], other=0.0).to(tl.float32)
        hv = tl.exp(Gend)[:, None] * hv + tl.dot(tl.trans(w), vc, input_precision=PREC)
    if STORE_FINAL_STATE:
        tl.store(hv_final + nh.to(tl.int64) * M * V + hv_off, hv, mask=hv_mask)


@triton.jit
def states_bwd_kernel(q, do, dz, p_all, G_all, dhk_final, dhv_final, dhk_chunks, dhv_chunks, dhk0, dhv0,
                      cu_seqlens, chunk_offsets, T,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                      BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    """dhk_chunks[c] / dhv_chunks[c] get the gradient w.r.t. the state at the END of chunk c.
    Programs 0 .. NK-1 walk the dHk row tiles, the next NV the dHv column tiles (as the forward)."""
    tile, nh = tl.program_id(0), tl.program_id(1)
    NK: tl.constexpr = (K + BK - 1) // BK
    if tile < NK:
        _walk_keys_bwd(q, dz, G_all, dhk_final, dhk_chunks, dhk0, cu_seqlens, chunk_offsets, T, tile, nh,
                       H, K, M, BT, BM, BK, USE_FINAL_STATE_GRADIENT, IS_VARLEN, PREC)
    else:
        _walk_values_bwd(do, p_all, G_all, dhv_final, dhv_chunks, dhv0, cu_seqlens, chunk_offsets, T,
                         tile - NK, nh, H, V, M, BT, BM, BV, USE_FINAL_STATE_GRADIENT, IS_VARLEN, PREC)


@triton.jit
def _walk_keys_bwd(q, dz, G_all, dhk_final, dhk_chunks, dhk0, cu_seqlens, chunk_offsets, T, tile, nh,
                   H: tl.constexpr, K: tl.constexpr, M: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
                   BK: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
                   PREC: tl.constexpr):
    n, h = nh // H, nh % H
    bos, eos, chunk0 = sequence_span(cu_seqlens, chunk_offsets, n, T, BT, IS_VARLEN)
    num_chunks = tl.cdiv(eos - bos, BT)
    m = tl.arange(0, BM)
    t = tl.arange(0, BT)
    kk = tile * BK + tl.arange(0, BK)
    hk_mask = (kk < K)[:, None] & (m < M)[None, :]
    hk_off = kk[:, None] * M + m[None, :]
    dhk = tl.zeros((BK, BM), dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        dhk += tl.load(dhk_final + nh.to(tl.int64) * K * M + hk_off, mask=hk_mask, other=0.0)
    for i in range(num_chunks):
        c = num_chunks - 1 - i
        t0 = bos + c * BT
        slot = chunk0 + c
        tl.store(dhk_chunks + (slot * H + h) * K * M + hk_off, dhk, mask=hk_mask)
        nvalid = eos - t0
        G, Gend = chunk_gates(G_all, t0, nvalid, h, H, M, BT, BM)
        dzc = load_rows(dz + (t0 * H + h) * M, t, H * M, nvalid, M, BM)
        qc = tl.load(q + (t0 * H + h) * K + t[:, None] * (H * K) + kk[None, :],
                     mask=(t < nvalid)[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
        dhk = dhk * tl.exp(Gend)[None, :] + tl.dot(tl.trans(qc), dzc * tl.exp(G), input_precision=PREC)
    tl.store(dhk0 + nh.to(tl.int64) * K * M + hk_off, dhk, mask=hk_mask)


@triton.jit
def _walk_values_bwd(do, p_all, G_all, dhv_final, dhv_chunks, dhv0, cu_seqlens, chunk_offsets, T, tile, nh,
                     H: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
                     BV: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
                     PREC: tl.constexpr):
    n, h = nh // H, nh % H
    bos, eos, chunk0 = sequence_span(cu_seqlens, chunk_offsets, n, T, BT, IS_VARLEN)
    num_chunks = tl.cdiv(eos - bos, BT)
    m = tl.arange(0, BM)
    t = tl.arange(0, BT)
    vv = tile * BV + tl.arange(0, BV)
    hv_mask = (m < M)[:, None] & (vv < V)[None, :]
    hv_off = m[:, None] * V + vv[None, :]
    dhv = tl.zeros((BM, BV), dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        dhv += tl.load(dhv_final + nh.to(tl.int64) * M * V + hv_off, mask=hv_mask, other=0.0)
    for i in range(num_chunks):
        c = num_chunks - 1 - i
        t0 = bos + c * BT
        slot = chunk0 + c
        tl.store(dhv_chunks + (slot * H + h) * M * V + hv_off, dhv, mask=hv_mask)
        nvalid = eos - t0
        G, Gend = chunk_gates(G_all, t0, nvalid, h, H, M, BT, BM)
        p = load_rows(p_all + (t0 * H + h) * M, t, H * M, nvalid, M, BM)
        doc = tl.load(do + (t0 * H + h) * V + t[:, None] * (H * V) + vv[None, :],
                      mask=(t < nvalid)[:, None] & (vv < V)[None, :], other=0.0).to(tl.float32)
        dhv = tl.exp(Gend)[:, None] * dhv + tl.dot(tl.trans(p * tl.exp(G)), doc, input_precision=PREC)
    tl.store(dhv0 + nh.to(tl.int64) * M * V + hv_off, dhv, mask=hv_mask)
