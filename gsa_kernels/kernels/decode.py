"""One decode step (T = 1 with a state) in two launches: the keys' memory and the partial scores by K
tiles, then the slot softmax, the values' memory and o by V tiles.

The step is memory-bound on the float32 state, K*M + M*V floats per (batch, kv head), read once and
written once. At small batch the (batch, kv head) pairs are far fewer than the SMs, so the work is cut
by tiles of the state instead: every tile is its own program, and each program reads its tile once.

    decode_keys    grid (K tiles, B * H): Hk_new[tile] = Hk[tile] diag(alpha) + k[tile] s^T (stored),
                   and the tile's share of the scores, zpart[tile] = q[tile]^T Hk_new[tile], per query head
    decode_values  grid (V tiles, B * H): z = scale * (sum of zpart over the K tiles),
                   p = softmax(z); Hv_new[:, tile] = diag(alpha) Hv[:, tile] + s v[tile]^T (stored),
                   o[tile] = p^T Hv_new[:, tile]

With PDL (programmatic dependent launch, sm90 and later) the second launch starts while the first
runs: each keys program lets it launch at once (griddepcontrol.launch_dependents), and each values
program updates and stores its Hv tile, which the keys never touch, before it waits for the whole first
grid and its writes (griddepcontrol.wait) to read the partial scores. The values' half of the state
traffic and the second launch's latency then hide behind the keys' half.

The scores need all of K, so they are summed across programs: the second launch is the barrier. A
one-launch step would have every program read all of Hk to form full scores (L2 reads of Hk growing
with the programs per head) and leaves each program a serial walk over K tiles, which at B = 1 made
the step latency-bound (docs/history/perf-notes.md, "Decode step"). The sum over tiles loads all of
them at once and adds them in one fixed tree, so the result does not depend on scheduling.

Grouped query heads (GQA): q and o have HQ = H * G heads, k, v, s, g and the states H (the kv
heads). The memories depend only on k, v, s and g, so a kv head's state tile is updated once, by its
program, and its G query heads h*G .. h*G+G-1 (consecutive) all read the new tile there: the scores
of the group are a [GP, BM] tile (GP = next power of two >= G, rows >= G padding, zero), one row per
query head. Each query head's score row and output tile is the same [BK, BM] (resp. [BM, BV]) product
and sum as without grouping, one static loop step per query head.

In place (hk_new is hk0): each tile is read and written by the same program, so every element is read
before it is overwritten. Slots are padded to BM = next power of two >= M and masked: any M works.

POOLED (a serving engine's state pool): hk0 / hv0 and hk_new / hv_new are the pools [S, H, ...] (per
kv head), batch row b reads and writes pool slot state_indices[b], from zeros where
has_initial_state[b] is False; a row with index -1 is padding: its output is 0 (every query head's)
and nothing is written.
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _state_row(bh, state_indices, has_initial_state, H: tl.constexpr, M: tl.constexpr, POOLED: tl.constexpr):
    """(state row, whether to write, slots read, slots written) of program row bh = (batch, kv head).
    The slot counts are integer bounds, not a boolean and-ed into the tile masks, since Triton 3.9's
    interpreter rejects a tile mask and-ed with a scalar condition."""
    row = bh.to(tl.int64)
    write = True
    m_read = M
    m_write = M
    if POOLED:
        slot = tl.load(state_indices + bh // H).to(tl.int64)
        write = slot >= 0
        read = write & (tl.load(has_initial_state + bh // H) != 0)
        m_read = tl.where(read, M, 0)
        m_write = tl.where(write, M, 0)
        row = tl.maximum(slot, 0) * H + bh % H
    return row, write, m_read, m_write


@triton.jit
def decode_keys_kernel(q, k, s, g, hk0, hk_new, zpart, state_indices, has_initial_state,
                       H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr,
                       USE_INITIAL_STATE: tl.constexpr, STORE_STATE: tl.constexpr, POOLED: tl.constexpr,
                       PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()      # the values' programs may start now: they wait for our writes
    i, bh = tl.program_id(0), tl.program_id(1)
    NBH = tl.num_programs(1)
    row, write, m_read, m_write = _state_row(bh, state_indices, has_initial_state, H, M, POOLED)
    mm = tl.arange(0, BM)
    mask_m = mm < M
    kk = i * BK + tl.arange(0, BK)
    mask_k = kk < K
    st = tl.load(s + bh * M + mm, mask=mask_m, other=0.0).to(tl.float32)
    kt = tl.load(k + bh * K + kk, mask=mask_k, other=0.0).to(tl.float32)
    hk = kt[:, None] * st[None, :]
    hk_off = row * K * M + kk[:, None] * M + mm[None, :]
    if USE_INITIAL_STATE:
        alpha = tl.exp(tl.load(g + bh * M + mm, mask=mask_m, other=0.0).to(tl.float32))
        hk += tl.load(hk0 + hk_off, mask=mask_k[:, None] & (mm < m_read)[None, :], other=0.0).to(tl.float32) * alpha[None, :]
    if STORE_STATE:
        tl.store(hk_new + hk_off, hk, mask=mask_k[:, None] & (mm < m_write)[None, :])
    rows = tl.arange(0, GP)     # the group's query heads
    z = tl.zeros((GP, BM), dtype=tl.float32)
    for r in tl.static_range(G):
        qt = tl.load(q + (bh * G + r) * K + kk, mask=mask_k, other=0.0).to(tl.float32)
        z += tl.where(rows[:, None] == r, tl.sum(qt[:, None] * hk, 0)[None, :], 0.0)
    tl.store(zpart + ((i * NBH + bh) * GP + rows[:, None]) * BM + mm[None, :], z)


@triton.jit
def _slot_probs(zpart, bh, NBH, scale, GP: tl.constexpr, BM: tl.constexpr, M: tl.constexpr, NKT: tl.constexpr,
                NKTP: tl.constexpr):
    """p [GP, BM]: the softmax over the slots of the keys' partial scores, summed over their K tiles.
    The NKT partial rows are loaded as one [NKTP, GP, BM] tile, not one after another: at B = 1 the
    step is latency-bound, and a loop of NKT (32 at K = 512, BK = 16) dependent loads was its tail."""
    tt = tl.arange(0, NKTP)
    rows = tl.arange(0, GP)
    mm = tl.arange(0, BM)
    parts = tl.load(zpart + ((tt[:, None, None] * NBH + bh) * GP + rows[None, :, None]) * BM + mm[None, None, :],
                    mask=(tt < NKT)[:, None, None], other=0.0)
    z = tl.sum(parts, 0)
    z = tl.where((mm < M)[None, :], z * scale, float("-inf"))
    p = tl.exp(z - tl.max(z, 1)[:, None])
    return p / tl.sum(p, 1)[:, None]


@triton.jit
def _values_memory(v, s, g, hv0, hv_new, bh, row, m_read, m_write, vv, mask_v, V: tl.constexpr, M: tl.constexpr,
                   BM: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_STATE: tl.constexpr):
    """Hv_new[:, tile] = diag(alpha) Hv[:, tile] + s v[tile]^T, stored when STORE_STATE, returned."""
    mm = tl.arange(0, BM)
    mask_m = mm < M
    st = tl.load(s + bh * M + mm, mask=mask_m, other=0.0).to(tl.float32)
    vt = tl.load(v + bh * V + vv, mask=mask_v, other=0.0).to(tl.float32)
    hv = st[:, None] * vt[None, :]
    hv_off = row * M * V + mm[:, None] * V + vv[None, :]
    if USE_INITIAL_STATE:
        alpha = tl.exp(tl.load(g + bh * M + mm, mask=mask_m, other=0.0).to(tl.float32))
        hv += alpha[:, None] * tl.load(hv0 + hv_off, mask=(mm < m_read)[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
    if STORE_STATE:
        tl.store(hv_new + hv_off, hv, mask=(mm < m_write)[:, None] & mask_v[None, :])
    return hv


@triton.jit
def decode_values_kernel(v, s, g, hv0, o, hv_new, zpart, state_indices, has_initial_state, scale,
                         H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                         BM: tl.constexpr, NKT: tl.constexpr, NKTP: tl.constexpr, BV: tl.constexpr,
                         USE_INITIAL_STATE: tl.constexpr, STORE_STATE: tl.constexpr, POOLED: tl.constexpr,
                         PDL: tl.constexpr):
    i, bh = tl.program_id(0), tl.program_id(1)
    NBH = tl.num_programs(1)
    row, write, m_read, m_write = _state_row(bh, state_indices, has_initial_state, H, M, POOLED)
    vv = i * BV + tl.arange(0, BV)
    mask_v = vv < V
    if PDL:
        # the values' memory first: it needs nothing from the keys' launch, which may still be running
        hv = _values_memory(v, s, g, hv0, hv_new, bh, row, m_read, m_write, vv, mask_v, V, M, BM,
                            USE_INITIAL_STATE, STORE_STATE)
        gdc_wait()                   # the keys' launch has finished and its partial scores are visible
        p = _slot_probs(zpart, bh, NBH, scale, GP, BM, M, NKT, NKTP)
    else:
        # after a plain launch the scores are ready: their loads first (at B = 1 this order measured
        # ~10% faster on the H200 than the values' memory first)
        p = _slot_probs(zpart, bh, NBH, scale, GP, BM, M, NKT, NKTP)
        hv = _values_memory(v, s, g, hv0, hv_new, bh, row, m_read, m_write, vv, mask_v, V, M, BM,
                            USE_INITIAL_STATE, STORE_STATE)
    rows = tl.arange(0, GP)
    for r in tl.static_range(G):
        pr = tl.sum(tl.where(rows[:, None] == r, p, 0.0), 0)     # row r of p (exact: the rest add 0)
        ot = tl.where(write, tl.sum(pr[:, None] * hv, 0), 0.0)
        tl.store(o + (bh * G + r) * V + vv, ot.to(o.dtype.element_ty), mask=mask_v)
