"""Backward of one chunk, in three launches around the reverse state walk of states.py.

1. chunk_bwd_dscores_kernel (per chunk; needs only this chunk's forward state Hv):
       dp     = exp(G) * (do Hv^T) + apply_causal(do v^T, s, G)
       dz     = scale * p * (dp - sum_m p dp)            gradient w.r.t. the unscaled scores
       dG_loc = dscores * scores + p * dp                the rows' own part of d loss / d G
   dz and p (float32) feed the reverse walk and kernels 2.
2. chunk_bwd_keys_kernel, then chunk_bwd_values_kernel (per chunk; need Hk, Hv at the chunk start and
   dHk', dHv' at its end). One program doing both sides held too many [BT, BT] and [BT, BM] tiles at
   once and spilled (docs/design.md, "Tried and rejected"); split, the keys side hands its share of
   ds (float32) and of the state carry to the values side, which finishes ds and dg. With
   w = s * exp(Gend - G), A = q k^T, Av = matrix_causal(p, s, G), dA = matrix_causal(dz, s, G):
       dq = (dz * exp(G)) Hk^T + dA k                   dk = dA^T q + w dHk'^T
       dv = Av^T do + w dHv'                             dAv = do v^T
       ds = apply_anticausal(A, dz, G) + apply_anticausal(dAv, p, G)
            + exp(Gend - G) * (k dHk' + v dHv'^T)
       dG = dG_loc - s * ds, plus on the chunk's last row the carry through the next state:
            exp(Gend) * (sum_k dHk' * Hk + sum_v dHv' * Hv) + sum_j s_j * (inter-chunk part of ds_j)
       dg = reverse cumulative sum of dG within the chunk (G is a cumulative sum of g).

Grouped query heads (GROUP > 1): every launch has a program per (chunk, query head hq), reading q,
do and the per-query-head tensors (scores, p, dz, dG_loc, ds_keys) of hq and k, v, s, G and the
states of its kv head hq // GROUP. dq is the query head's own; dk, dv, ds and dg sum over the GROUP
query heads of a kv head, so each program writes its float32 share (the outputs laid out per query
head, which the launcher sums over the group), and only the group's first query head adds the terms
through the state gradients (dHk', dHv': already summed over the group by the reverse walk), so
they count once. GROUP = 1 writes the gradients themselves.
"""

import triton
import triton.language as tl

from gsa_kernels.kernels.indexing import chunk_coords, starts_sequence
from gsa_kernels.kernels.intra import apply_anticausal, apply_causal, load_rows, matrix_causal
from gsa_kernels.kernels.states import chunk_gates, load_state


@triton.jit
def chunk_bwd_dscores_kernel(v, s, G_all, do, hv_chunks, hv_scales, scores, p_all, dz, dG_loc, cu_seqlens,
                             chunk_table, scale, T,
                             H: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                             BT: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr,
                             IS_VARLEN: tl.constexpr, PREC: tl.constexpr, STATES_COMPACT: tl.constexpr,
                             GROUP: tl.constexpr):
    pid, hq = tl.program_id(0), tl.program_id(1)
    HQ: tl.constexpr = H * GROUP
    h = hq // GROUP
    t0, nvalid, exists = chunk_coords(cu_seqlens, chunk_table, pid, T, BT, IS_VARLEN)
    if exists:
        slot = pid.to(tl.int64)
        t = tl.arange(0, BT)
        m = tl.arange(0, BM)
        row_mask = (t < nvalid)[:, None]
        slot_mask = (m < M)[None, :]
        io_mask = row_mask & slot_mask
        off = (t0 * HQ + hq) * M + t[:, None] * (HQ * M) + m[None, :]     # the query head's rows
        s_chunk = s + (t0 * H + h) * M
        G_chunk = G_all + (t0 * H + h) * M
        G, Gend = chunk_gates(G_all, t0, nvalid, h, H, M, BT, BM)
        sc = load_rows(s_chunk, t, H * M, nvalid, M, BM)
        sv = tl.load(scores + off, mask=io_mask, other=0.0)
        e = tl.exp(tl.where(slot_mask, sv, float("-inf")) - tl.max(tl.where(slot_mask, sv, float("-inf")), axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]

        dph = tl.zeros((BT, BM), dtype=tl.float32)
        dAv = tl.zeros((BT, BT), dtype=tl.float32)
        for i in range(tl.cdiv(V, BV)):
            vv = i * BV + tl.arange(0, BV)
            vmask = row_mask & (vv < V)[None, :]
            doc = tl.load(do + (t0 * HQ + hq) * V + t[:, None] * (HQ * V) + vv[None, :], mask=vmask, other=0.0)
            vc = tl.load(v + (t0 * H + h) * V + t[:, None] * (H * V) + vv[None, :], mask=vmask, other=0.0)
            hv = load_state(hv_chunks, hv_scales, (slot * H + h) * M * V + m[:, None] * V + vv[None, :],
                            (m < M)[:, None] & (vv < V)[None, :], (slot * H + h) * V + vv, vv < V, False,
                            STATES_COMPACT)
            dph += tl.dot(doc.to(tl.float32), tl.trans(hv), input_precision=PREC)
            dAv += tl.dot(doc, tl.trans(vc), input_precision=PREC)
        dp = tl.exp(G) * dph + apply_causal(dAv, sc, G, G_chunk, H * M, nvalid, M, BT, BM, PREC)
        dscores = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        tl.store(p_all + off, p, mask=io_mask)
        tl.store(dz + off, scale * dscores, mask=io_mask)
        tl.store(dG_loc + off, dscores * sv + p * dp, mask=io_mask)


@triton.jit
def chunk_bwd_keys_kernel(q, k, s, G_all, hk_chunks, dhk_chunks, hk_scales, dhk_scales, dz, dq, dk, ds_keys,
                          carry_keys, cu_seqlens, chunk_table, T,
                          H: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
                          BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                          IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
                          STATES_COMPACT: tl.constexpr, DSTATES_COMPACT: tl.constexpr, GROUP: tl.constexpr):
    """Keys side: dq, dk; and the keys' share of ds (float32, to ds_keys) and of the state carry.
    dk, ds_keys and carry_keys are per query head (GROUP > 1: each a share of the kv head's)."""
    pid, hq = tl.program_id(0), tl.program_id(1)
    HQ: tl.constexpr = H * GROUP
    h = hq // GROUP
    t0, nvalid, exists = chunk_coords(cu_seqlens, chunk_table, pid, T, BT, IS_VARLEN)
    if exists:
        slot = pid.to(tl.int64)
        t = tl.arange(0, BT)
        m = tl.arange(0, BM)
        row_mask = (t < nvalid)[:, None]
        slot_mask = (m < M)[None, :]
        off = (t0 * HQ + hq) * M + t[:, None] * (HQ * M) + m[None, :]     # the query head's rows
        G_chunk = G_all + (t0 * H + h) * M
        G, Gend = chunk_gates(G_all, t0, nvalid, h, H, M, BT, BM)
        sc = load_rows(s + (t0 * H + h) * M, t, H * M, nvalid, M, BM)
        dzc = load_rows(dz + (t0 * HQ + hq) * M, t, HQ * M, nvalid, M, BM)
        dA = matrix_causal(dzc, sc, G, G_chunk, H * M, nvalid, M, BT, BM, PREC)
        dze = dzc * tl.exp(G)

        A = tl.zeros((BT, BT), dtype=tl.float32)
        ds_inter = tl.zeros((BT, BM), dtype=tl.float32)
        carry = tl.zeros((BM,), dtype=tl.float32)
        for i in range(tl.cdiv(K, BK)):
            kk = i * BK + tl.arange(0, BK)
            kmask = row_mask & (kk < K)[None, :]
            qoff = (t0 * HQ + hq) * K + t[:, None] * (HQ * K) + kk[None, :]     # also dk's (per query head)
            st_mask = (kk < K)[:, None] & slot_mask
            st_off = (slot * H + h) * K * M + kk[:, None] * M + m[None, :]
            qc = tl.load(q + qoff, mask=kmask, other=0.0)
            kc = tl.load(k + (t0 * H + h) * K + t[:, None] * (H * K) + kk[None, :], mask=kmask, other=0.0)
            sc_off = (slot * H + h) * K + kk
            hk = load_state(hk_chunks, hk_scales, st_off, st_mask, sc_off, kk < K, True, STATES_COMPACT)
            dhk = load_state(dhk_chunks, dhk_scales, st_off, st_mask, sc_off, kk < K, True, DSTATES_COMPACT)
            if GROUP > 1:   # the terms through dHk' count once per kv head: in its first query head
                dhk = tl.where(hq % GROUP == 0, dhk, 0.0)
            dqc = tl.dot(dze, tl.trans(hk), input_precision=PREC) \
                + tl.dot(dA, kc.to(tl.float32), input_precision=PREC)
            dkc = tl.dot(tl.trans(dA), qc.to(tl.float32), input_precision=PREC) \
                + tl.dot(sc * tl.exp(Gend[None, :] - G), tl.trans(dhk), input_precision=PREC)
            tl.store(dq + qoff, dqc.to(dq.dtype.element_ty), mask=kmask)
            tl.store(dk + qoff, dkc.to(dk.dtype.element_ty), mask=kmask)
            A += tl.dot(qc, tl.trans(kc), input_precision=PREC)
            ds_inter += tl.dot(kc.to(tl.float32), dhk, input_precision=PREC)
            carry += tl.sum(dhk * hk, axis=0)

        ds_inter = ds_inter * tl.exp(Gend[None, :] - G)
        dsc = ds_inter + apply_anticausal(A, dzc, G, G_chunk, H * M, nvalid, M, BT, BM, PREC)
        tl.store(ds_keys + off, dsc, mask=row_mask & slot_mask)
        carry = tl.exp(Gend) * carry + tl.sum(sc * ds_inter, axis=0)
        tl.store(carry_keys + (slot * HQ + hq) * M + m, carry, mask=m < M)


@triton.jit
def chunk_bwd_values_kernel(v, s, G_all, do, hv_chunks, dhv_chunks, hv_scales, dhv_scales, p_all, dG_loc,
                            ds_keys, carry_keys, dv, ds, dg, cu_seqlens, chunk_table, T,
                            H: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                            BT: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr,
                            USE_INITIAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
                            STATES_COMPACT: tl.constexpr, DSTATES_COMPACT: tl.constexpr, GROUP: tl.constexpr):
    """Values side: dv; then ds (both shares) and dg, the reverse cumulative sum of dG plus the carry.
    dv, ds and dg are per query head (GROUP > 1: each a share of the kv head's)."""
    pid, hq = tl.program_id(0), tl.program_id(1)
    HQ: tl.constexpr = H * GROUP
    h = hq // GROUP
    t0, nvalid, exists = chunk_coords(cu_seqlens, chunk_table, pid, T, BT, IS_VARLEN)
    if exists:
        slot = pid.to(tl.int64)
        t = tl.arange(0, BT)
        m = tl.arange(0, BM)
        row_mask = (t < nvalid)[:, None]
        slot_mask = (m < M)[None, :]
        io_mask = row_mask & slot_mask
        off = (t0 * HQ + hq) * M + t[:, None] * (HQ * M) + m[None, :]     # the query head's rows
        G_chunk = G_all + (t0 * H + h) * M
        G, Gend = chunk_gates(G_all, t0, nvalid, h, H, M, BT, BM)
        sc = load_rows(s + (t0 * H + h) * M, t, H * M, nvalid, M, BM)
        p = load_rows(p_all + (t0 * HQ + hq) * M, t, HQ * M, nvalid, M, BM)
        Av = matrix_causal(p, sc, G, G_chunk, H * M, nvalid, M, BT, BM, PREC)

        dAv = tl.zeros((BT, BT), dtype=tl.float32)
        ds_inter = tl.zeros((BT, BM), dtype=tl.float32)
        carry = tl.zeros((BM,), dtype=tl.float32)
        for i in range(tl.cdiv(V, BV)):
            vv = i * BV + tl.arange(0, BV)
            vmask = row_mask & (vv < V)[None, :]
            qoff = (t0 * HQ + hq) * V + t[:, None] * (HQ * V) + vv[None, :]     # do's and dv's
            st_mask = (m < M)[:, None] & (vv < V)[None, :]
            st_off = (slot * H + h) * M * V + m[:, None] * V + vv[None, :]
            vc = tl.load(v + (t0 * H + h) * V + t[:, None] * (H * V) + vv[None, :], mask=vmask, other=0.0)
            doc = tl.load(do + qoff, mask=vmask, other=0.0)
            sc_off = (slot * H + h) * V + vv
            hv = load_state(hv_chunks, hv_scales, st_off, st_mask, sc_off, vv < V, False, STATES_COMPACT)
            dhv = load_state(dhv_chunks, dhv_scales, st_off, st_mask, sc_off, vv < V, False, DSTATES_COMPACT)
            if GROUP > 1:   # the terms through dHv' count once per kv head: in its first query head
                dhv = tl.where(hq % GROUP == 0, dhv, 0.0)
            dvc = tl.dot(tl.trans(Av), doc.to(tl.float32), input_precision=PREC) \
                + tl.dot(sc * tl.exp(Gend[None, :] - G), dhv, input_precision=PREC)
            tl.store(dv + qoff, dvc.to(dv.dtype.element_ty), mask=vmask)
            dAv += tl.dot(doc, tl.trans(vc), input_precision=PREC)
            ds_inter += tl.dot(vc.to(tl.float32), tl.trans(dhv), input_precision=PREC)
            carry += tl.sum(dhv * hv, axis=1)

        ds_inter = ds_inter * tl.exp(Gend[None, :] - G)
        dsc = tl.load(ds_keys + off, mask=io_mask, other=0.0) + ds_inter \
            + apply_anticausal(dAv, p, G, G_chunk, H * M, nvalid, M, BT, BM, PREC)
        tl.store(ds + off, dsc.to(ds.dtype.element_ty), mask=io_mask)

        # dg: every row t of the chunk gets the dG of rows i >= t; the state carry reaches them all
        dG = tl.load(dG_loc + off, mask=io_mask, other=0.0) - sc * dsc
        carry = tl.load(carry_keys + (slot * HQ + hq) * M + m, mask=m < M, other=0.0) \
            + tl.exp(Gend) * carry + tl.sum(sc * ds_inter, axis=0)
        dgc = tl.cumsum(dG, axis=0, reverse=True) + carry[None, :]
        if not USE_INITIAL_STATE:
            # a sequence's first gate only decays the (absent) initial state: its gradient is exactly
            # 0, where the sum above leaves float32 cancellation residue
            first = starts_sequence(chunk_table, pid, T, BT, IS_VARLEN) & (t == 0)
            dgc = tl.where(first[:, None], 0.0, dgc)
        tl.store(dg + off, dgc.to(dg.dtype.element_ty), mask=io_mask)
