"""One decode step (T = 1 with a state): both memory updates, the slot softmax and the output in one launch.

Grouped query heads (GQA): q and o have HQ = H * G heads, k, v, s, g and the states H (the kv
heads). The memories depend only on k, v, s and g, so a kv head's state is updated once, by the
programs of its (batch, kv head), and its G query heads h*G .. h*G+G-1 (consecutive) all read the
new state there: the scores of the group are a [GP, BM] tile (GP = next power of two >= G, rows >= G
padding, never stored), one row per query head. Without grouping G = 1 and the tile is one row.

The step is memory-bound on the float32 state, K*M + M*V floats per (batch, kv head), read once and
written once; with GQA that is 1/G of it per query head. At small batch one program per (batch, kv
head) would leave most of the GPU idle, so every (batch, kv head) gets SPLIT programs, program j of
them owning

    the K row tiles i of Hk with i % SPLIT == j   (it writes those rows of the new Hk)
    the V column tiles i of Hv with i % SPLIT == j (it writes those columns of the new Hv and of o)

The output needs the scores over all slots, and the scores need all of K:
z = scale * q^T Hk_new = scale * sum over every K tile. A cross-program reduction would need a grid
barrier (a second launch, or spin-waiting on other programs), so instead every program reads the
whole of Hk and recomputes the full scores rows of the group; the rows of Hk it does not own it
updates in registers and drops. The trade-off: L2 reads of Hk grow SPLIT-fold (the first program to
touch a row brings it from HBM, its siblings, launched next to it, hit L2), while HBM traffic stays
at the floor:

    HBM bytes per (batch, kv head)  ~ 4 * (K*M + M*V) read + 4 * (K*M + M*V) written (+ q, k, v, s, g, o)
    L2 bytes per (batch, kv head)   ~ 4 * SPLIT * K*M read for the scores

so SPLIT is picked (configs.py) to fill the GPU at small batch and is 1 once B*H alone does. With
grouped heads every split also recomputes the G score rows of the group, so the launcher picks SPLIT
for B * HQ instead: the recomputed score work stays what it is without grouping.

Each query head's score row and output tile is the same [BK, BM] (resp. [BM, BV]) product and sum as
without grouping, one static loop step per query head (not a [GP, BK, BM] product: that would hold G
times the registers), so G = 1 computes exactly what the ungrouped step did.

In place (hk_new is hk0): a program that writes rows another program still has to read would race,
so the launcher uses SPLIT = 1 then: each tile is read and written by the same program, in the same
loop iteration, so every element is read before it is overwritten.
Slots are padded to BM = next power of two >= M and masked: any M works.

POOLED (a serving engine's state pool): hk0 / hv0 and hk_new / hv_new are the pools [S, H, ...] (per
kv head), batch row b reads and writes pool slot state_indices[b], from zeros where
has_initial_state[b] is False; a row with index -1 is padding: its output is 0 (every query head's)
and nothing is written.
"""
import triton
import triton.language as tl


@triton.jit
def decode_kernel(q, k, v, s, g, hk0, hv0, o, hk_new, hv_new, state_indices, has_initial_state, scale,
                  H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                  K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                  BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr,
                  USE_INITIAL_STATE: tl.constexpr, STORE_STATE: tl.constexpr, POOLED: tl.constexpr):
    j, bh = tl.program_id(0), tl.program_id(1)    # bh: (batch, kv head); its query heads are rows bh*G + r
    bh64 = bh.to(tl.int64)      # the state row (the pool slot's, when POOLED)
    write = True                # whether the new state is written (POOLED: per row)
    m_read = M                  # the initial state's slots read (POOLED: 0 for a row that reads none)
    m_write = M                 # and the new state's written; integer bounds, since Triton 3.9's
                                # interpreter rejects a tile mask and-ed with a scalar condition
    if POOLED:
        slot = tl.load(state_indices + bh // H).to(tl.int64)
        write = slot >= 0
        read = write & (tl.load(has_initial_state + bh // H) != 0)
        m_read = tl.where(read, M, 0)
        m_write = tl.where(write, M, 0)
        bh64 = tl.maximum(slot, 0) * H + bh % H
    mm = tl.arange(0, BM)
    mask_m = mm < M
    rows = tl.arange(0, GP)     # the group's query heads
    st = tl.load(s + bh * M + mm, mask=mask_m, other=0.0).to(tl.float32)
    alpha = tl.exp(tl.load(g + bh * M + mm, mask=mask_m, other=0.0).to(tl.float32))

    # keys: row r of z accumulates q_r^T Hk_new over the K tiles seen so far (all of them, for full rows)
    z = tl.zeros((GP, BM), dtype=tl.float32)
    for i in range(tl.cdiv(K, BK)):
        kk = i * BK + tl.arange(0, BK)
        mask_k = kk < K
        hk_off = bh64 * K * M + kk[:, None] * M + mm[None, :]
        kt = tl.load(k + bh * K + kk, mask=mask_k, other=0.0).to(tl.float32)
        hk = kt[:, None] * st[None, :]
        if USE_INITIAL_STATE:
            hk += tl.load(hk0 + hk_off, mask=mask_k[:, None] & (mm < m_read)[None, :], other=0.0).to(tl.float32) * alpha[None, :]
        for r in tl.static_range(G):
            qt = tl.load(q + (bh * G + r) * K + kk, mask=mask_k, other=0.0).to(tl.float32)
            z += tl.where(rows[:, None] == r, tl.sum(qt[:, None] * hk, 0)[None, :], 0.0)
        if STORE_STATE:
            if i % SPLIT == j:
                tl.store(hk_new + hk_off, hk, mask=mask_k[:, None] & (mm < m_write)[None, :])

    z = tl.where(mask_m, z * scale, float("-inf"))
    p = tl.exp(z - tl.max(z, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]

    # values: this program's V tiles only; o is complete per tile (the slot sum is inside)
    for i in range(j, tl.cdiv(V, BV), SPLIT):
        vv = i * BV + tl.arange(0, BV)
        mask_v = vv < V
        hv_off = bh64 * M * V + mm[:, None] * V + vv[None, :]
        vt = tl.load(v + bh * V + vv, mask=mask_v, other=0.0).to(tl.float32)
        hv = st[:, None] * vt[None, :]
        if USE_INITIAL_STATE:
            hv += alpha[:, None] * tl.load(hv0 + hv_off, mask=(mm < m_read)[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
        for r in tl.static_range(G):
            pr = tl.sum(tl.where(rows[:, None] == r, p, 0.0), 0)     # row r of p (exact: the rest add 0)
            ot = tl.where(write, tl.sum(pr[:, None] * hv, 0), 0.0)
            tl.store(o + (bh * G + r) * V + vv, ot.to(o.dtype.element_ty), mask=mask_v)
        if STORE_STATE:
            tl.store(hv_new + hv_off, hv, mask=(mm < m_write)[:, None] & mask_v[None, :])
