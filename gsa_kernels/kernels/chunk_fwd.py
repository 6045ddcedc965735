"""Forward of one chunk: keys pass, slot softmax and values pass, fused in one program per (chunk, head).

With Hk, Hv the slot memories at the chunk start (from states.py), G the within-chunk cumulative log
gate and A = q k^T (unscaled, unmasked: the intra helpers only read its causal part):

    scores = scale * (exp(G) * (q Hk) + apply_causal(A, s, G))          [BT, M], float32
    p      = softmax over slots (scores)                                float32, never rounded
    o      = (p * exp(G)) Hv + matrix_causal(p, s, G) v                  [BT, V]

The scores are saved (float32) for the backward, which rebuilds p from them.

A NaN or inf in a chunk's k, v, s or g must reach only its own row and the rows after it, as in the
recurrence. The fast form does not guarantee that: the intra-chunk dots multiply the pairs outside the
causal order by 0, and 0 times a non-finite value is NaN, so one bad row can make earlier rows NaN.
But any such leak leaves a non-finite value in the chunk's output, so each program records whether
its output holds one (one reduction per program, into `bad_chunks`), and a second launch of this
kernel with SAFE computes again only the chunks so flagged: every non-finite value of k, v, s and G
taken as 0, the level splits' gate rows read before the first bad gate row, and the rows from the
first bad row of k, v, s or g on written as NaN (a non-finite q stays in its own row in both forms).
Chunks after a bad token are flagged too (their states are non-finite) and come out non-finite, as
they should.

Grouped query heads (GROUP > 1): a program per (chunk, query head hq); q, o and the scores are the
query head's ([*, H * GROUP, .] rows), k, v, s, G and the chunk states those of its kv head
hq // GROUP, so the GROUP query heads of a kv head read one memory.
"""
import triton
import triton.language as tl

from gsa_kernels.kernels.dots import dot_acc_scaled, halves
from gsa_kernels.kernels.indexing import chunk_coords
from gsa_kernels.kernels.intra import apply_causal, load_rows, matrix_causal
from gsa_kernels.kernels.states import chunk_gates


@triton.jit
def _finite_rows(x):
    """(x with its non-finite values as 0, and per row 1 where it held one, else 0)."""
    ok = tl.abs(x) < float("inf")      # false for NaN too
    return tl.where(ok, x, tl.zeros_like(x)), tl.max(tl.where(ok, 0, 1), axis=1)


@triton.jit
def chunk_fwd_kernel(q, k, v, s, G_all, hk_chunks, hv_chunks, hk_scales, hv_scales, o, scores_out, cu_seqlens,
                     chunk_table, bad_chunks, scale, T,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                     BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr, COMPACT_HK: tl.constexpr,
                     COMPACT_HV: tl.constexpr, STORE_SCORES: tl.constexpr, GROUP: tl.constexpr,
                     SAFE: tl.constexpr):
    """COMPACT_HK / COMPACT_HV: Hk's / Hv's states are scaled float16 (states.py `_store_scaled`); Hk's
    row scales fold into q's columns and Hv's column scales into the output's, both exact (powers of
    two). The scores a backward reads take float32 Hk (its 16-bit halves: the softmax backward
    amplifies what an 11-bit Hk would lose), so COMPACT_HK is the forward-only path's. STORE_SCORES:
    the float32 scores for a backward (the forward-only path has none to read them).
    SAFE: only the chunks that the fast launch flagged in bad_chunks [chunks, HQ], each exactly."""
    pid, hq = tl.program_id(0), tl.program_id(1)
    HQ: tl.constexpr = H * GROUP
    h = hq // GROUP         # the kv head: its k, v, s, G and states
    t0, nvalid, exists = chunk_coords(cu_seqlens, chunk_table, pid, T, BT, IS_VARLEN)
    flag = bad_chunks + pid.to(tl.int64) * HQ + hq
    if SAFE:
        exists = exists & (tl.load(flag) != 0)
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
        nvalid_g = nvalid       # the rows whose G the level splits may read from memory
        if SAFE:
            sc, bad = _finite_rows(sc)
            G, bad_g = _finite_rows(G)
            bad = tl.maximum(bad, bad_g)
            nvalid_g = tl.maximum(1, tl.minimum(nvalid, tl.min(tl.where(bad_g > 0, t, BT), axis=0)))
            for i in range(tl.cdiv(V, BV)):
                vv = i * BV + tl.arange(0, BV)
                vc = tl.load(v + (t0 * H + h) * V + t[:, None] * (H * V) + vv[None, :],
                             mask=row_mask & (vv < V)[None, :], other=0.0)
                _, bad_v = _finite_rows(vc)
                bad = tl.maximum(bad, bad_v)

        # keys pass: inter-chunk q Hk and the unscaled q k^T, both reduced over K
        qh = tl.zeros((BT, BM), dtype=tl.float32)
        A = tl.zeros((BT, BT), dtype=tl.float32)
        for i in range(tl.cdiv(K, BK)):
            kk = i * BK + tl.arange(0, BK)
            kmask = row_mask & (kk < K)[None, :]
            qc = tl.load(q + (t0 * HQ + hq) * K + t[:, None] * (HQ * K) + kk[None, :], mask=kmask, other=0.0)
            kc = tl.load(k + (t0 * H + h) * K + t[:, None] * (H * K) + kk[None, :], mask=kmask, other=0.0)
            if SAFE:
                kc, bad_k = _finite_rows(kc)
                bad = tl.maximum(bad, bad_k)
            hk = tl.load(hk_chunks + (slot * H + h) * K * M + kk[:, None] * M + m[None, :],
                         mask=(kk < K)[:, None] & slot_mask, other=0.0).to(tl.float32)
            if COMPACT_HK:
                # float16 Hk and q times a power of two: both exact in tf32
                qf = qc.to(tl.float32) * tl.load(hk_scales + (slot * H + h) * K + kk, mask=kk < K, other=0.0)[None, :]
                qh += tl.dot(qf, hk, input_precision=PREC)
            else:
                # Hk as 16-bit halves: tf32 would truncate it to 11 bits, and the softmax amplifies that
                qh = dot_acc_scaled(qc, hk, qh, PREC)
            A += tl.dot(qc, tl.trans(kc), input_precision=PREC)
        scores = scale * (tl.exp(G) * qh
                          + apply_causal(A, sc, G, G_chunk, H * M, nvalid_g, M, BT, BM, PREC))
        if SAFE:
            poisoned = (tl.cumsum(bad, axis=0) > 0)[:, None]       # from the first bad row on
        if STORE_SCORES:
            kept = scores
            if SAFE:
                kept = tl.where(poisoned, float("nan"), scores)
            tl.store(scores_out + (t0 * HQ + hq) * M + t[:, None] * (HQ * M) + m[None, :], kept,
                     mask=row_mask & slot_mask)

        # slot softmax, in float32 registers
        scores = tl.where(slot_mask, scores, float("-inf"))
        e = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]

        # values pass: inter-chunk (p * exp(G)) Hv plus the gated intra-chunk attention on v.
        # SPLIT16 (half inputs): the loop-invariant float32 operands go to the tensor cores as 16-bit
        # halves (dots.py), so that the tiles loaded in the loop (v, and Hv when compact) feed the dots
        # as stored: no conversion waits on their loads, and the halves keep more bits than tf32 (pe <= 1
        # and |Av| <= max |s|: float16 halves cannot overflow). Chunks of 64 keep the tf32 form: there the
        # halves gave o 0.2 off on the H200 (M 128, float16, 4 warps) where the interpreter is exact, taken
        # for a Triton 3.6 miscompile (docs/history/perf-notes.md, "Chunk 64 fenced").
        Av = matrix_causal(p, sc, G, G_chunk, H * M, nvalid_g, M, BT, BM, PREC)
        pe = p * tl.exp(G)
        SPLIT16: tl.constexpr = (v.dtype.element_ty != tl.float32) and (BT <= 32)
        if SPLIT16:
            av_hi, av_lo = halves(Av, v.dtype.element_ty)
            if COMPACT_HV:
                pe_hi, pe_lo = halves(pe, tl.float16)
        probe = tl.zeros((BT, BV), dtype=tl.float32)      # 0, or NaN where an output is not finite
        for i in range(tl.cdiv(V, BV)):
            vv = i * BV + tl.arange(0, BV)
            vmask = row_mask & (vv < V)[None, :]
            vc = tl.load(v + (t0 * H + h) * V + t[:, None] * (H * V) + vv[None, :], mask=vmask, other=0.0)
            if SAFE:
                vc, _ = _finite_rows(vc)
            hv = tl.load(hv_chunks + (slot * H + h) * M * V + m[:, None] * V + vv[None, :],
                         mask=(m < M)[:, None] & (vv < V)[None, :], other=0.0)
            if SPLIT16 and COMPACT_HV:
                inter = tl.dot(pe_lo, hv, tl.dot(pe_hi, hv))
            else:
                inter = tl.dot(pe, hv.to(tl.float32), input_precision=PREC)
            if COMPACT_HV:
                inter = inter * tl.load(hv_scales + (slot * H + h) * V + vv, mask=vv < V, other=0.0)[None, :]
            if SPLIT16:
                oc = tl.dot(av_lo, vc, tl.dot(av_hi, vc, inter))
            else:
                oc = inter + tl.dot(Av, vc.to(tl.float32), input_precision=PREC)
            if SAFE:
                oc = tl.where(poisoned, float("nan"), oc)
            else:
                probe += oc * 0.0
            tl.store(o + (t0 * HQ + hq) * V + t[:, None] * (HQ * V) + vv[None, :], oc.to(o.dtype.element_ty),
                     mask=vmask)
        if not SAFE:
            tl.store(flag, (tl.sum(tl.sum(probe, axis=1), axis=0) != 0).to(tl.int32))
