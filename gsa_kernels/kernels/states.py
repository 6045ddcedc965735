"""The two slot memories at every chunk boundary, forward (hk, hv) and backward (dhk, dhv), in one launch each.

Neither memory depends on the slot softmax: Hk depends on (k, s, g) and Hv on (s, v, g). So one
launch builds both: programs [0, NK) own a [BK, BM] row tile of Hk, programs [NK, NK + NV) a [BM, BV]
column tile of Hv, and each walks its sequence's chunks in order. With w = s * exp(Gend - G):

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
from gsa_kernels.kernels.intra import load_gates


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
    tile, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos, eos, chunk0 = sequence_span(cu_seqlens, chunk_offsets, n, T, BT, IS_VARLEN)
    num_chunks = tl.cdiv(eos - bos, BT)
    NK: tl.constexpr = triton.cdiv(K, BK)
    m = tl.arange(0, BM)
    t = tl.arange(0, BT)
    if tile < NK:
        # hk rows [BK, BM]: hk holds the state at the start of chunk c
        kk = tile * BK + tl.arange(0, BK)
        tile_mask = (kk < K)[:, None] & (m < M)[None, :]
        tile_off = kk[:, None] * M + m[None, :]
        hk = tl.zeros((BK, BM), dtype=tl.float32)
        if USE_INITIAL_STATE:
            hk += tl.load(hk0 + nh.to(tl.int64) * K * M + tile_off, mask=tile_mask, other=0.0)
        for c in range(num_chunks):
            rows = bos + c * BT + t
            slot = chunk0 + c
            tl.store(hk_chunks + (slot * H + h) * K * M + tile_off, hk, mask=tile_mask)
            G, Gend = chunk_gates(G_all, bos + c * BT, eos - bos - c * BT, h, H, M, BT, BM)
            row_mask = (rows < eos)[:, None]
            sc = tl.load(s + (rows[:, None] * H + h) * M + m[None, :], mask=row_mask & (m < M)[None, :],
                         other=0.0).to(tl.float32)
            w = sc * tl.exp(Gend[None, :] - G)
            kc = tl.load(k + (rows[:, None] * H + h) * K + kk[None, :], mask=row_mask & (kk < K)[None, :],
                         other=0.0).to(tl.float32)
            hk = hk * tl.exp(Gend)[None, :] + tl.dot(tl.trans(kc), w, input_precision=PREC)
        if STORE_FINAL_STATE:
            tl.store(hk_final + nh.to(tl.int64) * K * M + tile_off, hk, mask=tile_mask)
    else:
        # hv columns [BM, BV]
        vv = (tile - NK) * BV + tl.arange(0, BV)
        tile_mask = (m < M)[:, None] & (vv < V)[None, :]
        tile_off = m[:, None] * V + vv[None, :]
        hv = tl.zeros((BM, BV), dtype=tl.float32)
        if USE_INITIAL_STATE:
            hv += tl.load(hv0 + nh.to(tl.int64) * M * V + tile_off, mask=tile_mask, other=0.0)
        for c in range(num_chunks):
            rows = bos + c * BT + t
            slot = chunk0 + c
            tl.store(hv_chunks + (slot * H + h) * M * V + tile_off, hv, mask=tile_mask)
            G, Gend = chunk_gates(G_all, bos + c * BT, eos - bos - c * BT, h, H, M, BT, BM)
            row_mask = (rows < eos)[:, None]
            sc = tl.load(s + (rows[:, None] * H + h) * M + m[None, :], mask=row_mask & (m < M)[None, :],
                         other=0.0).to(tl.float32)
            w = sc * tl.exp(Gend[None, :] - G)
            vc = tl.load(v + (rows[:, None] * H + h) * V + vv[None, :], mask=row_mask & (vv < V)[None, :],
                         other=0.0).to(tl.float32)
            hv = tl.exp(Gend)[:, None] * hv + tl.dot(tl.trans(w), vc, input_precision=PREC)
        if STORE_FINAL_STATE:
            tl.store(hv_final + nh.to(tl.int64) * M * V + tile_off, hv, mask=tile_mask)


@triton.jit
def states_bwd_kernel(q, do, dz, p_all, G_all, dhk_final, dhv_final, dhk_chunks, dhv_chunks, dhk0, dhv0,
                      cu_seqlens, chunk_offsets, T,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                      BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    """dhk_chunks[c] / dhv_chunks[c] get the gradient w.r.t. the state at the END of chunk c."""
    tile, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos, eos, chunk0 = sequence_span(cu_seqlens, chunk_offsets, n, T, BT, IS_VARLEN)
    num_chunks = tl.cdiv(eos - bos, BT)
    NK: tl.constexpr = triton.cdiv(K, BK)
    m = tl.arange(0, BM)
    t = tl.arange(0, BT)
    if tile < NK:
        kk = tile * BK + tl.arange(0, BK)
        tile_mask = (kk < K)[:, None] & (m < M)[None, :]
        tile_off = kk[:, None] * M + m[None, :]
        dhk = tl.zeros((BK, BM), dtype=tl.float32)
        if USE_FINAL_STATE_GRADIENT:
            dhk += tl.load(dhk_final + nh.to(tl.int64) * K * M + tile_off, mask=tile_mask, other=0.0)
        for i in range(num_chunks):
            c = num_chunks - 1 - i
            rows = bos + c * BT + t
            slot = chunk0 + c
            tl.store(dhk_chunks + (slot * H + h) * K * M + tile_off, dhk, mask=tile_mask)
            G, Gend = chunk_gates(G_all, bos + c * BT, eos - bos - c * BT, h, H, M, BT, BM)
            row_mask = (rows < eos)[:, None]
            dzc = tl.load(dz + (rows[:, None] * H + h) * M + m[None, :], mask=row_mask & (m < M)[None, :],
                          other=0.0)
            qc = tl.load(q + (rows[:, None] * H + h) * K + kk[None, :], mask=row_mask & (kk < K)[None, :],
                         other=0.0).to(tl.float32)
            dhk = dhk * tl.exp(Gend)[None, :] + tl.dot(tl.trans(qc), dzc * tl.exp(G), input_precision=PREC)
        tl.store(dhk0 + nh.to(tl.int64) * K * M + tile_off, dhk, mask=tile_mask)
    else:
        vv = (tile - NK) * BV + tl.arange(0, BV)
        tile_mask = (m < M)[:, None] & (vv < V)[None, :]
        tile_off = m[:, None] * V + vv[None, :]
        dhv = tl.zeros((BM, BV), dtype=tl.float32)
        if USE_FINAL_STATE_GRADIENT:
            dhv += tl.load(dhv_final + nh.to(tl.int64) * M * V + tile_off, mask=tile_mask, other=0.0)
        for i in range(num_chunks):
            c = num_chunks - 1 - i
            rows = bos + c * BT + t
            slot = chunk0 + c
            tl.store(dhv_chunks + (slot * H + h) * M * V + tile_off, dhv, mask=tile_mask)
            G, Gend = chunk_gates(G_all, bos + c * BT, eos - bos - c * BT, h, H, M, BT, BM)
            row_mask = (rows < eos)[:, None]
            p = tl.load(p_all + (rows[:, None] * H + h) * M + m[None, :], mask=row_mask & (m < M)[None, :],
                        other=0.0)
            doc = tl.load(do + (rows[:, None] * H + h) * V + vv[None, :], mask=row_mask & (vv < V)[None, :],
                          other=0.0).to(tl.float32)
            dhv = tl.exp(Gend)[:, None] * dhv + tl.dot(tl.trans(p * tl.exp(G)), doc, input_precision=PREC)
        tl.store(dhv0 + nh.to(tl.int64) * M * V + tile_off, dhv, mask=tile_mask)
