"""Token-by-token GSA (fused_recurrent): forward in 2 launches, backward in 4, no per-step states stored.

The two slot memories evolve column by column (Hk) and row by row (Hv) with no coupling between
slots: slot m of Hk_t depends only on (k, s[m], g[m]), and likewise for Hv. Only the slot softmax
couples the slots. So a program can own a tile of slots and still reduce over the whole K (or V)
axis, or own a tile of K (or V) and see every slot. Per step t (a = exp(g_t), z the scaled scores):

    Hk_t = Hk_{t-1} * a[None, :] + k_t s_t^T       z_t = scale * Hk_t^T q_t       p_t = softmax(z_t)
    Hv_t = a[:, None] * Hv_{t-1} + s_t v_t^T       o_t = Hv_t^T p_t

Forward:
  fwd_keys    program (slot tile, n*h) holds Hk[:, slots] (all K): writes z (float32) and final Hk.
  fwd_values  program (V tile, n*h) holds Hv[:, vtile] (all slots): softmax of the z row, writes o
              and final Hv.
Backward (the adjoints dHk_t = dHk_{t+1} * a_{t+1} + scale q_t dz_t^T and
dHv_t = a_{t+1} dHv_{t+1} + p_t do_t^T, with dz = p * (dp - sum(p * dp)) and dp_t = Hv_t do_t):
  bwd_dp      program (slot tile, n*h) walks forward holding Hv[slots, :] (all V): dp.
  bwd_keys    program (K tile, n*h): forward walk with Hk[ktile, :] for dq = scale Hk_t dz_t, then a
              reverse walk with dHk[ktile, :] for dk = dHk_t s_t, the K-tile's part of
              ds = dHk_t^T k_t, and dhk0.
  bwd_values  program (V tile, n*h): reverse walk with dHv[:, vtile]: dv = dHv_t^T s_t, the V-tile's
              part of ds = dHv_t v_t, and dhv0.
  bwd_gates   program (n*h): sums the ds parts (a reduction in the kernel, deterministic) and forms
              dg in one reverse walk.

Grouped query heads (GQA: q, o, the scores, dq and dp with HQ = G * H heads; k, v, s, g, their
gradients and the states with H): every program above owns a tile of one kv head's state, walks it
once, and serves the G query heads h*G + r (r < G) of its group in a static loop over r. fwd_keys
writes G score rows per token, fwd_values and bwd_dp read and write G rows, bwd_keys writes G dq rows,
and the adjoints sum over the group: dHk_t gains scale q_t dz_t^T and dHv_t gains p_t do_t^T of
every query head of the group, dg the score terms of each. So dk, dv, ds, dg and the initial-state
gradients come out per kv head with no reduction afterwards, and the state work is 1/G of repeating
the kv heads. G = 1 runs exactly the ungrouped arithmetic. (fused_recurrent.py says which callers
still repeat the kv heads.)

The gate gradient without any state: every dependence on g_r runs through a decay exp(Gc_t - Gc_j)
with j < r <= t (Gc the cumulative sum of g). Summing the products "adjoint x value" over t >= r
counts every pair (t, j <= t); subtracting s_j ds_j for j >= r removes the pairs with j >= r. So

    dg_r = sum_{t >= r} (dz_t * z_t + p_t * dp_t - s_t * ds_t) + sum_k dHk_T * Hk_T + sum_v dHv_T * Hv_T

(the last two only with a final-state gradient; with grouped heads dz_t * z_t + p_t * dp_t summed
over the group's query heads). This avoids walking the states backwards, which would divide by
exp(g) (inf once g < -88, garbage long before), and avoids storing T states.
"""
import triton
import triton.language as tl


@triton.jit
def token_span(cu_seqlens, n, T, IS_VARLEN: tl.constexpr):
    """First and end token (flattened rows) of sequence n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + n).to(tl.int64)
        eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
    else:
        bos = n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def slot_softmax(z):
    """Softmax over the slot axis of a [BM] row whose padded slots hold -inf."""
    p = tl.exp(z - tl.max(z, 0))
    return p / tl.sum(p, 0)


@triton.jit
def softmax_and_grad(z_row, dp_row, m, M):
    """p = softmax(z) and dz = p * (dp - sum(p * dp)) of one token's full slot rows, float32 [BM]."""
    mask = m < M
    p = slot_softmax(tl.load(z_row + m, mask=mask, other=float("-inf")))
    dp = tl.load(dp_row + m, mask=mask, other=0.0)
    return p, p * (dp - tl.sum(p * dp, 0))


@triton.jit
def recurrent_fwd_keys_kernel(q, k, s, g, hk0, scores, hk_final, cu_seqlens, scale, T,
                              H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
                              BK: tl.constexpr, BMS: tl.constexpr,
                              USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                              IS_VARLEN: tl.constexpr):
    i_m, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos, eos = token_span(cu_seqlens, n, T, IS_VARLEN)
    kk = tl.arange(0, BK)
    mm = i_m * BMS + tl.arange(0, BMS)
    mask_k, mask_m = kk < K, mm < M
    hk_mask = mask_k[:, None] & mask_m[None, :]
    hk_off = nh.to(tl.int64) * K * M + kk[:, None] * M + mm[None, :]
    # hk holds Hk_t[:, slots] after step t
    hk = tl.zeros((BK, BMS), dtype=tl.float32)
    if USE_INITIAL_STATE:
        hk += tl.load(hk0 + hk_off, mask=hk_mask, other=0.0)
    for t in range(bos, eos):
        kt = tl.load(k + (t * H + h) * K + kk, mask=mask_k, other=0.0).to(tl.float32)
        st = tl.load(s + (t * H + h) * M + mm, mask=mask_m, other=0.0).to(tl.float32)
        gt = tl.load(g + (t * H + h) * M + mm, mask=mask_m, other=0.0).to(tl.float32)
        hk = hk * tl.exp(gt)[None, :] + kt[:, None] * st[None, :]
        for r in tl.static_range(G):
            qh = (t * H + h) * G + r        # query head h*G + r of token t
            qt = tl.load(q + qh * K + kk, mask=mask_k, other=0.0).to(tl.float32)
            z = scale * tl.sum(qt[:, None] * hk, 0)
            tl.store(scores + qh * M + mm, z, mask=mask_m)
    if STORE_FINAL_STATE:
        tl.store(hk_final + hk_off, hk, mask=hk_mask)


@triton.jit
def recurrent_fwd_values_kernel(v, s, g, scores, hv0, o, hv_final, cu_seqlens, T,
                                H: tl.constexpr, G: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                                BM: tl.constexpr, BV: tl.constexpr,
                                USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                                IS_VARLEN: tl.constexpr):
    i_v, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos, eos = token_span(cu_seqlens, n, T, IS_VARLEN)
    mm = tl.arange(0, BM)
    vv = i_v * BV + tl.arange(0, BV)
    mask_m, mask_v = mm < M, vv < V
    hv_mask = mask_m[:, None] & mask_v[None, :]
    hv_off = nh.to(tl.int64) * M * V + mm[:, None] * V + vv[None, :]
    # hv holds Hv_t[:, vtile] after step t
    hv = tl.zeros((BM, BV), dtype=tl.float32)
    if USE_INITIAL_STATE:
        hv += tl.load(hv0 + hv_off, mask=hv_mask, other=0.0)
    for t in range(bos, eos):
        vt = tl.load(v + (t * H + h) * V + vv, mask=mask_v, other=0.0).to(tl.float32)
        st = tl.load(s + (t * H + h) * M + mm, mask=mask_m, other=0.0).to(tl.float32)
        gt = tl.load(g + (t * H + h) * M + mm, mask=mask_m, other=0.0).to(tl.float32)
        hv = tl.exp(gt)[:, None] * hv + st[:, None] * vt[None, :]
        for r in tl.static_range(G):
            qh = (t * H + h) * G + r
            p = slot_softmax(tl.load(scores + qh * M + mm, mask=mask_m, other=float("-inf")))
            ot = tl.sum(p[:, None] * hv, 0)
            tl.store(o + qh * V + vv, ot.to(o.dtype.element_ty), mask=mask_v)
    if STORE_FINAL_STATE:
        tl.store(hv_final + hv_off, hv, mask=hv_mask)


@triton.jit
def recurrent_bwd_dp_kernel(v, s, g, do, hv0, dp, cu_seqlens, T,
                            H: tl.constexpr, G: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                            BMS: tl.constexpr, BV: tl.constexpr,
                            USE_INITIAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr):
    """dp_t = Hv_t do_t per query head, walking forward with Hv[slots, :] (all of V, so the sum is complete)."""
    i_m, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos, eos = token_span(cu_seqlens, n, T, IS_VARLEN)
    mm = i_m * BMS + tl.arange(0, BMS)
    vv = tl.arange(0, BV)
    mask_m, mask_v = mm < M, vv < V
    hv = tl.zeros((BMS, BV), dtype=tl.float32)
    if USE_INITIAL_STATE:
        hv += tl.load(hv0 + nh.to(tl.int64) * M * V + mm[:, None] * V + vv[None, :],
                      mask=mask_m[:, None] & mask_v[None, :], other=0.0)
    for t in range(bos, eos):
        vt = tl.load(v + (t * H + h) * V + vv, mask=mask_v, other=0.0).to(tl.float32)
        st = tl.load(s + (t * H + h) * M + mm, mask=mask_m, other=0.0).to(tl.float32)
        gt = tl.load(g + (t * H + h) * M + mm, mask=mask_m, other=0.0).to(tl.float32)
        hv = tl.exp(gt)[:, None] * hv + st[:, None] * vt[None, :]
        for r in tl.static_range(G):
            qh = (t * H + h) * G + r
            dot = tl.load(do + qh * V + vv, mask=mask_v, other=0.0).to(tl.float32)
            tl.store(dp + qh * M + mm, tl.sum(hv * dot[None, :], 1), mask=mask_m)


@triton.jit
def recurrent_bwd_keys_kernel(q, k, s, g, scores, dp, hk0, dhk_final, dq, dk, ds_parts, dhk0,
                              cu_seqlens, scale, T, part_stride,
                              H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
                              BKS: tl.constexpr, BM: tl.constexpr,
                              USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr,
                              IS_VARLEN: tl.constexpr):
    i_k, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos, eos = token_span(cu_seqlens, n, T, IS_VARLEN)
    kk = i_k * BKS + tl.arange(0, BKS)
    mm = tl.arange(0, BM)
    mask_k, mask_m = kk < K, mm < M
    hk_mask = mask_k[:, None] & mask_m[None, :]
    hk_off = nh.to(tl.int64) * K * M + kk[:, None] * M + mm[None, :]

    # forward walk: hk holds Hk_t[ktile, :] after step t
    hk = tl.zeros((BKS, BM), dtype=tl.float32)
    if USE_INITIAL_STATE:
        hk += tl.load(hk0 + hk_off, mask=hk_mask, other=0.0)
    for t in range(bos, eos):
        kt = tl.load(k + (t * H + h) * K + kk, mask=mask_k, other=0.0).to(tl.float32)
        st = tl.load(s + (t * H + h) * M + mm, mask=mask_m, other=0.0).to(tl.float32)
        gt = tl.load(g + (t * H + h) * M + mm, mask=mask_m, other=0.0).to(tl.float32)
        hk = hk * tl.exp(gt)[None, :] + kt[:, None] * st[None, :]
        for r in tl.static_range(G):
            qh = (t * H + h) * G + r
            _, dz = softmax_and_grad(scores + qh * M, dp + qh * M, mm, M)
            dqt = scale * tl.sum(hk * dz[None, :], 1)
            tl.store(dq + qh * K + kk, dqt.to(dq.dtype.element_ty), mask=mask_k)

    # reverse walk: before step t's update, dhk holds a_{t+1} * dHk_{t+1}[ktile, :] (the group's
    # query heads all read Hk_t, so their terms add up in the one adjoint)
    dhk = tl.zeros((BKS, BM), dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        dhk += tl.load(dhk_final + hk_off, mask=hk_mask, other=0.0)
    part = ds_parts + i_k.to(tl.int64) * part_stride
    for i in range(eos - bos):
        t = eos - 1 - i
        kt = tl.load(k + (t * H + h) * K + kk, mask=mask_k, other=0.0).to(tl.float32)
        st = tl.load(s + (t * H + h) * M + mm, mask=mask_m, other=0.0).to(tl.float32)
        gt = tl.load(g + (t * H + h) * M + mm, mask=mask_m, other=0.0).to(tl.float32)
        for r in tl.static_range(G):
            qh = (t * H + h) * G + r
            qt = tl.load(q + qh * K + kk, mask=mask_k, other=0.0).to(tl.float32)
            _, dz = softmax_and_grad(scores + qh * M, dp + qh * M, mm, M)
            dhk += scale * qt[:, None] * dz[None, :]
        tl.store(dk + (t * H + h) * K + kk, tl.sum(dhk * st[None, :], 1).to(dk.dtype.element_ty), mask=mask_k)
        tl.store(part + (t * H + h) * M + mm, tl.sum(dhk * kt[:, None], 0), mask=mask_m)
        dhk = dhk * tl.exp(gt)[None, :]
    if USE_INITIAL_STATE:
        tl.store(dhk0 + hk_off, dhk, mask=hk_mask)


@triton.jit
def recurrent_bwd_values_kernel(v, s, g, scores, do, dhv_final, dv, ds_parts, dhv0,
                                cu_seqlens, T, part_stride,
                                H: tl.constexpr, G: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                                BM: tl.constexpr, BVS: tl.constexpr,
                                USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr,
                                IS_VARLEN: tl.constexpr):
    i_v, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos, eos = token_span(cu_seqlens, n, T, IS_VARLEN)
    mm = tl.arange(0, BM)
    vv = i_v * BVS + tl.arange(0, BVS)
    mask_m, mask_v = mm < M, vv < V
    hv_mask = mask_m[:, None] & mask_v[None, :]
    hv_off = nh.to(tl.int64) * M * V + mm[:, None] * V + vv[None, :]
    # before step t's update, dhv holds a_{t+1} * dHv_{t+1}[:, vtile] (summed over the group's query heads)
    dhv = tl.zeros((BM, BVS), dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        dhv += tl.load(dhv_final + hv_off, mask=hv_mask, other=0.0)
    part = ds_parts + i_v.to(tl.int64) * part_stride
    for i in range(eos - bos):
        t = eos - 1 - i
        vt = tl.load(v + (t * H + h) * V + vv, mask=mask_v, other=0.0).to(tl.float32)
        st = tl.load(s + (t * H + h) * M + mm, mask=mask_m, other=0.0).to(tl.float32)
        gt = tl.load(g + (t * H + h) * M + mm, mask=mask_m, other=0.0).to(tl.float32)
        for r in tl.static_range(G):
            qh = (t * H + h) * G + r
            p = slot_softmax(tl.load(scores + qh * M + mm, mask=mask_m, other=float("-inf")))
            dot = tl.load(do + qh * V + vv, mask=mask_v, other=0.0).to(tl.float32)
            dhv += p[:, None] * dot[None, :]
        tl.store(dv + (t * H + h) * V + vv, tl.sum(dhv * st[:, None], 0).to(dv.dtype.element_ty), mask=mask_v)
        tl.store(part + (t * H + h) * M + mm, tl.sum(dhv * vt[None, :], 1), mask=mask_m)
        dhv = tl.exp(gt)[:, None] * dhv
    if USE_INITIAL_STATE:
        tl.store(dhv0 + hv_off, dhv, mask=hv_mask)


@triton.jit
def recurrent_bwd_gates_kernel(s, scores, dp, dsk_parts, dsv_parts, hk_final, hv_final, dhk_final, dhv_final,
                               ds, dg, cu_seqlens, T, part_stride, NK, NV,
                               H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                               M: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                               USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr,
                               IS_VARLEN: tl.constexpr):
    """ds = sum of the K-tile and V-tile parts; dg by the reverse sum of the module docstring, its
    score terms summed over the group's query heads.
    Without an initial state the first gate of a sequence only decays zeros: its dg is exactly 0,
    and is stored as 0 (the reverse sum would leave a float32 cancellation residue there)."""
    nh = tl.program_id(0)
    n, h = nh // H, nh % H
    bos, eos = token_span(cu_seqlens, n, T, IS_VARLEN)
    mm = tl.arange(0, BM)
    mask_m = mm < M
    # acc holds dg_t: the final-state terms plus the sum over the steps seen so far (t' >= t)
    acc = tl.zeros((BM,), dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            off = nh.to(tl.int64) * K * M + kk[:, None] * M + mm[None, :]
            msk = (kk < K)[:, None] & mask_m[None, :]
            acc += tl.sum(tl.load(dhk_final + off, mask=msk, other=0.0) * tl.load(hk_final + off, mask=msk, other=0.0), 0)
        for v0 in range(0, V, BV):
            vv = v0 + tl.arange(0, BV)
            off = nh.to(tl.int64) * M * V + mm[:, None] * V + vv[None, :]
            msk = mask_m[:, None] & (vv < V)[None, :]
            acc += tl.sum(tl.load(dhv_final + off, mask=msk, other=0.0) * tl.load(hv_final + off, mask=msk, other=0.0), 1)
    for i in range(eos - bos):
        t = eos - 1 - i
        row = (t * H + h) * M
        # the score terms dz * z + p * dp of the group's query heads
        score_terms = tl.zeros((BM,), dtype=tl.float32)
        for r in tl.static_range(G):
            qrow = ((t * H + h) * G + r) * M
            p, dz = softmax_and_grad(scores + qrow, dp + qrow, mm, M)
            z = tl.load(scores + qrow + mm, mask=mask_m, other=0.0)
            dpt = tl.load(dp + qrow + mm, mask=mask_m, other=0.0)
            score_terms += dz * z + p * dpt
        st = tl.load(s + row + mm, mask=mask_m, other=0.0).to(tl.float32)
        dst = tl.zeros((BM,), dtype=tl.float32)
        # step the pointers part by part (64-bit address arithmetic: NK * part_stride may pass 2^31)
        part = dsk_parts + row + mm
        for _ in range(NK):
            dst += tl.load(part, mask=mask_m, other=0.0)
            part += part_stride
        part = dsv_parts + row + mm
        for _ in range(NV):
            dst += tl.load(part, mask=mask_m, other=0.0)
            part += part_stride
        acc += score_terms - st * dst
        tl.store(ds + row + mm, dst.to(ds.dtype.element_ty), mask=mask_m)
        dgt = acc
        if not USE_INITIAL_STATE:
            dgt = tl.where(t == bos, 0.0, acc)
        tl.store(dg + row + mm, dgt.to(dg.dtype.element_ty), mask=mask_m)
