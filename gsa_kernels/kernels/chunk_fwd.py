"""Forward of one chunk: keys pass, slot softmax and values pass, fused in one program per (chunk, head).

With Hk, Hv the slot memories at the chunk start (from states.py), G the within-chunk cumulative log
gate and A = q k^T (unscaled, unmasked: the intra helpers only read its causal part):

    scores = scale * (exp(G) * (q Hk) + apply_causal(A, s, G))          [BT, M], float32
    p      = softmax over slots (scores)                                float32, never rounded
    o      = (p * exp(G)) Hv + matrix_causal(p, s, G) v                  [BT, V]

The scores are saved (float32) for the backward, which rebuilds p from them.

Grouped query heads (GROUP > 1): a program per (chunk, query head hq); q, o and the scores are the
query head's ([*, H * GROUP, .] rows), k, v, s, G and the chunk states those of its kv head
hq // GROUP, so the GROUP query heads of a kv head read one memory.
"""
import triton
import triton.language as tl

from gsa_kernels.kernels.dots import dot_acc_scaled
from gsa_kernels.kernels.indexing import chunk_coords
from gsa_kernels.kernels.intra import apply_causal, load_rows, matrix_causal
from gsa_kernels.kernels.states import chunk_gates


@triton.jit
def chunk_fwd_kernel(q, k, v, s, G_all, hk_chunks, hv_chunks, hk_scales, hv_scales, o, scores_out, cu_seqlens,
                     chunk_table, scale, T,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                     BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr, COMPACT: tl.constexpr,
                     GROUP: tl.constexpr):
    """COMPACT: the states are scaled float16 (states.py `_store_scaled`); Hk's row scales fold into
    q's columns and Hv's column scales into the output's, both exact (powers of two), and the scores
    are not stored (the forward-only path has no backward to read them)."""
    pid, hq = tl.program_id(0), tl.program_id(1)
    HQ: tl.constexpr = H * GROUP
    h = hq // GROUP         # the kv head: its k, v, s, G and states
    t0, nvalid, exists = chunk_coords(cu_seqlens, chunk_table, pid, T, BT, IS_VARLEN)
    if exists:
        slot = pid.to(tl.int64)
        t = tl.arange(0, BT)
        m = tl.arange(0, BM)
        row_mask = (t < nvalid)[:, None]
        slot_mask = (m < M)[None, :]
        s_chunk = s + (t0 * H + h) * M                     # row r of this chunk at s_chunk + r * H * M
        G, Gend = chunk_gates(G_all, t0, nvalid, h, H, M, BT, BM)
        G_chunk = G_all + (t0 * H + h) * M
        sc = load_rows(s_chunk, t, H * M, nvalid, M, BM)

        # keys pass: inter-chunk q Hk and the unscaled q k^T, both reduced over K
        qh = tl.zeros((BT, BM), dtype=tl.float32)
        A = tl.zeros((BT, BT), dtype=tl.float32)
        for i in range(tl.cdiv(K, BK)):
            kk = i * BK + tl.arange(0, BK)
            kmask = row_mask & (kk < K)[None, :]
            qc = tl.load(q + (t0 * HQ + hq) * K + t[:, None] * (HQ * K) + kk[None, :], mask=kmask, other=0.0)
            kc = tl.load(k + (t0 * H + h) * K + t[:, None] * (H * K) + kk[None, :], mask=kmask, other=0.0)
            hk = tl.load(hk_chunks + (slot * H + h) * K * M + kk[:, None] * M + m[None, :],
                         mask=(kk < K)[:, None] & slot_mask, other=0.0).to(tl.float32)
            if COMPACT:
                # float16 Hk and q times a power of two: both exact in tf32
                qf = qc.to(tl.float32) * tl.load(hk_scales + (slot * H + h) * K + kk, mask=kk < K, other=0.0)[None, :]
                qh += tl.dot(qf, hk, input_precision=PREC)
            else:
                # Hk as 16-bit halves: tf32 would truncate it to 11 bits, and the softmax amplifies that
                qh = dot_acc_scaled(qc, hk, qh, PREC)
            A += tl.dot(qc, tl.trans(kc), input_precision=PREC)
        scores = scale * (tl.exp(G) * qh
                          + apply_causal(A, sc, G, G_chunk, H * M, nvalid, M, BT, BM, PREC))
        if not COMPACT:
            tl.store(scores_out + (t0 * HQ + hq) * M + t[:, None] * (HQ * M) + m[None, :], scores,
                     mask=row_mask & slot_mask)

        # slot softmax, in float32 registers
        scores = tl.where(slot_mask, scores, float("-inf"))
        e = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]

        # values pass: inter-chunk (p * exp(G)) Hv plus the gated intra-chunk attention on v
        Av = matrix_causal(p, sc, G, G_chunk, H * M, nvalid, M, BT, BM, PREC)
        pe = p * tl.exp(G)
        for i in range(tl.cdiv(V, BV)):
            vv = i * BV + tl.arange(0, BV)
            vmask = row_mask & (vv < V)[None, :]
            vc = tl.load(v + (t0 * H + h) * V + t[:, None] * (H * V) + vv[None, :], mask=vmask, other=0.0)
            hv = tl.load(hv_chunks + (slot * H + h) * M * V + m[:, None] * V + vv[None, :],
                         mask=(m < M)[:, None] & (vv < V)[None, :], other=0.0).to(tl.float32)
            inter = tl.dot(pe, hv, input_precision=PREC)
            if COMPACT:
                inter = inter * tl.load(hv_scales + (slot * H + h) * V + vv, mask=vv < V, other=0.0)[None, :]
            oc = inter + tl.dot(Av, vc.to(tl.float32), input_precision=PREC)
            tl.store(o + (t0 * HQ + hq) * V + t[:, None] * (HQ * V) + vv[None, :], oc.to(o.dtype.element_ty),
                     mask=vmask)
