"""Forward of one chunk: keys pass, slot softmax and values pass, fused in one program per (chunk, head).

With Hk, Hv the slot memories at the chunk start (from states.py), G the within-chunk cumulative log
gate and A = q k^T (unscaled, unmasked: the intra helpers only read its causal part):

    scores = scale * (exp(G) * (q Hk) + apply_causal(A, s, G))          [BT, M], float32
    p      = softmax over slots (scores)                                float32, never rounded
    o      = (p * exp(G)) Hv + matrix_causal(p, s, G) v                  [BT, V]

The scores are saved (float32) for the backward, which rebuilds p from them.
"""
import triton
import triton.language as tl

from gsa_kernels.kernels.intra import apply_causal, matrix_causal
from gsa_kernels.kernels.states import chunk_gates


@triton.jit
def chunk_coords(cu_seqlens, chunk_table, pid, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first row of the chunk, end token of its sequence); pid is also the chunk's state slot.

    Varlen: chunk_table[pid] = (sequence, chunk within sequence), or sequence -1 for grid padding."""
    if IS_VARLEN:
        n = tl.load(chunk_table + 2 * pid)
        c = tl.load(chunk_table + 2 * pid + 1)
        valid = n >= 0
        n = tl.maximum(n, 0)
        bos = tl.load(cu_seqlens + n).to(tl.int64)
        eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
    else:
        NT = tl.cdiv(T, BT)
        n, c = pid // NT, pid % NT
        valid = n >= 0
        bos = n.to(tl.int64) * T
        eos = bos + T
    return bos + c * BT, eos, valid


@triton.jit
def chunk_fwd_kernel(q, k, v, s, g, hk_chunks, hv_chunks, o, scores_out, cu_seqlens, chunk_table,
                     scale, T,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    t0, eos, valid = chunk_coords(cu_seqlens, chunk_table, pid, T, BT, IS_VARLEN)
    if valid:
        slot = pid.to(tl.int64)
        rows = t0 + tl.arange(0, BT)
        row_mask = (rows < eos)[:, None]
        m = tl.arange(0, BM)
        slot_mask = (m < M)[None, :]
        G, Gend = chunk_gates(g, rows, eos, h, H, M, BT, BM)
        sc = tl.load(s + (rows[:, None] * H + h) * M + m[None, :], mask=row_mask & slot_mask,
                     other=0.0).to(tl.float32)

        # keys pass: inter-chunk q Hk and the unscaled q k^T, both reduced over K
        qh = tl.zeros((BT, BM), dtype=tl.float32)
        A = tl.zeros((BT, BT), dtype=tl.float32)
        for i in range(tl.cdiv(K, BK)):
            kk = i * BK + tl.arange(0, BK)
            kmask = row_mask & (kk < K)[None, :]
            qc = tl.load(q + (rows[:, None] * H + h) * K + kk[None, :], mask=kmask, other=0.0)
            kc = tl.load(k + (rows[:, None] * H + h) * K + kk[None, :], mask=kmask, other=0.0)
            hk = tl.load(hk_chunks + (slot * H + h) * K * M + kk[:, None] * M + m[None, :],
                         mask=(kk < K)[:, None] & slot_mask, other=0.0)
            qh += tl.dot(qc.to(tl.float32), hk, input_precision=PREC)
            A += tl.dot(qc, tl.trans(kc), input_precision=PREC)
        scores = scale * (tl.exp(G) * qh + apply_causal(A, sc, G, BT, BC, BM, PREC))
        tl.store(scores_out + (rows[:, None] * H + h) * M + m[None, :], scores, mask=row_mask & slot_mask)

        # slot softmax, in float32 registers
        scores = tl.where(slot_mask, scores, float("-inf"))
        e = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]

        # values pass: inter-chunk (p * exp(G)) Hv plus the gated intra-chunk attention on v
        Av = matrix_causal(p, sc, G, BT, BC, BM, PREC)
        pe = p * tl.exp(G)
        for i in range(tl.cdiv(V, BV)):
            vv = i * BV + tl.arange(0, BV)
            vmask = row_mask & (vv < V)[None, :]
            vc = tl.load(v + (rows[:, None] * H + h) * V + vv[None, :], mask=vmask, other=0.0)
            hv = tl.load(hv_chunks + (slot * H + h) * M * V + m[:, None] * V + vv[None, :],
                         mask=(m < M)[:, None] & (vv < V)[None, :], other=0.0)
            oc = tl.dot(pe, hv, input_precision=PREC) + tl.dot(Av, vc.to(tl.float32), input_precision=PREC)
            tl.store(o + (rows[:, None] * H + h) * V + vv[None, :], oc.to(o.dtype.element_ty), mask=vmask)
