"""Intra-chunk products with a per-slot decay: the three shapes that GSA's forward and backward need.

Inside a chunk of BT rows, with G the within-chunk cumulative sum of the log gate (per slot, so G is
non-increasing down the rows), every intra-chunk term of GSA is one of

    apply_causal     out[i, m] = sum_{j <= i} X[i, j] * Y[j, m] * exp(G[i, m] - G[j, m])   [BT, BM]
    matrix_causal    out[i, j] = sum_m        X[i, m] * Y[j, m] * exp(G[i, m] - G[j, m])   [BT, BT], j <= i
    apply_anticausal out[j, m] = sum_{i >= j} X[i, j] * Y[i, m] * exp(G[i, m] - G[j, m])   [BT, BM]

The decay depends on (i, j, m) together, so it cannot be folded into one matmul without a positive
exponent somewhere (exp(-G[j]) overflows once the chunk has forgotten more than e^-88). We split the
chunk into NC = BT / BC sub-chunks:
  * a pair (i, j) in different sub-chunks I > J goes through the row r = I * BC - 1 just before
    sub-chunk I:  exp(G[i] - G[j]) = exp(G[i] - G[r]) * exp(G[r] - G[j]), both factors <= 1, so the
    sum over j is a tensor-core dot;
  * a pair in the same sub-chunk is done exactly, one in-sub-chunk offset b at a time, on the
    [NC, BC, BM] view of the chunk (every exponent masked to <= 0 before exp).
All inputs are float32 register tensors; padded rows must carry Y = 0 and a flat G (g = 0 there), and
padded slots Y = 0, so nothing they touch is inf or NaN. PREC is the tl.dot input precision of
float32 operands ("ieee" for float32 inputs, "tf32" for half-precision inputs).
"""
import triton
import triton.language as tl


@triton.jit
def _row(x, rows, r):
    """Row r of a [BT, BM] register tensor, as [BM] (a masked reduction: registers cannot be sliced)."""
    return tl.sum(tl.where(rows[:, None] == r, x, 0.0), axis=0)


@triton.jit
def _sub_rows(x3, b, BC: tl.constexpr):
    """Row b of every sub-chunk of a [NC, BC, BM] view, as [NC, BM]."""
    pick = (tl.arange(0, BC) == b)[None, :, None]
    return tl.sum(tl.where(pick, x3, 0.0), axis=1)


@triton.jit
def _diag_blocks(x, BT: tl.constexpr, BC: tl.constexpr):
    """The NC diagonal [BC, BC] blocks of a [BT, BT] matrix, as [NC, BC, BC]."""
    NC: tl.constexpr = BT // BC
    x4 = tl.reshape(x, (NC, BC, NC, BC))
    same = tl.arange(0, NC)[:, None, None, None] == tl.arange(0, NC)[None, None, :, None]
    return tl.sum(tl.where(same, x4, 0.0), axis=2)


@triton.jit
def apply_causal(X, Y, G, BT: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """out[i, m] = sum_{j <= i} X[i, j] Y[j, m] exp(G[i, m] - G[j, m]); X [BT, BT], Y and G [BT, BM]."""
    NC: tl.constexpr = BT // BC
    rows = tl.arange(0, BT)
    sub = rows // BC
    out = tl.zeros((BT, BM), dtype=tl.float32)
    # j in an earlier sub-chunk than i: factor the decay through row r = I*BC - 1.
    for I in tl.static_range(1, NC):
        Gr = _row(G, rows, I * BC - 1)
        before = (rows < I * BC)[:, None]
        Yr = tl.where(before, Y * tl.exp(tl.where(before, Gr[None, :] - G, 0.0)), 0.0)
        part = tl.dot(X, Yr, input_precision=PREC)
        inside = (sub == I)[:, None]
        out += tl.where(inside, tl.exp(tl.where(inside, G - Gr[None, :], 0.0)) * part, 0.0)
    # j in i's own sub-chunk, at offset b <= i's offset a.
    G3 = tl.reshape(G, (NC, BC, BM))
    Y3 = tl.reshape(Y, (NC, BC, BM))
    Xd = _diag_blocks(X, BT, BC)
    a = tl.arange(0, BC)[None, :, None]
    out3 = tl.zeros((NC, BC, BM), dtype=tl.float32)
    for b in tl.static_range(BC):
        Yb = _sub_rows(Y3, b, BC)
        Gb = _sub_rows(G3, b, BC)
        xb = tl.sum(tl.where((tl.arange(0, BC) == b)[None, None, :], Xd, 0.0), axis=2)   # X[i, j_b]
        valid = a >= b
        decay = tl.exp(tl.where(valid, G3 - Gb[:, None, :], 0.0))
        out3 += tl.where(valid, xb[:, :, None] * Yb[:, None, :] * decay, 0.0)
    return out + tl.reshape(out3, (BT, BM))


@triton.jit
def matrix_causal(X, Y, G, BT: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """out[i, j] = sum_m X[i, m] Y[j, m] exp(G[i, m] - G[j, m]) for j <= i, else 0; [BT, BT]."""
    NC: tl.constexpr = BT // BC
    rows = tl.arange(0, BT)
    sub = rows // BC
    out = tl.zeros((BT, BT), dtype=tl.float32)
    for I in tl.static_range(1, NC):
        Gr = _row(G, rows, I * BC - 1)
        inside = (sub == I)[:, None]
        before = (rows < I * BC)[:, None]
        Xr = tl.where(inside, X * tl.exp(tl.where(inside, G - Gr[None, :], 0.0)), 0.0)
        Yr = tl.where(before, Y * tl.exp(tl.where(before, Gr[None, :] - G, 0.0)), 0.0)
        out += tl.dot(Xr, tl.trans(Yr), input_precision=PREC)
    G3 = tl.reshape(G, (NC, BC, BM))
    X3 = tl.reshape(X, (NC, BC, BM))
    Y3 = tl.reshape(Y, (NC, BC, BM))
    a = tl.arange(0, BC)[None, :, None]
    col = tl.arange(0, BC)[None, None, :]
    diag = tl.zeros((NC, BC, BC), dtype=tl.float32)
    for b in tl.static_range(BC):
        Yb = _sub_rows(Y3, b, BC)
        Gb = _sub_rows(G3, b, BC)
        valid = a >= b
        decay = tl.exp(tl.where(valid, G3 - Gb[:, None, :], 0.0))
        val = tl.sum(tl.where(valid, X3 * Yb[:, None, :] * decay, 0.0), axis=2)     # [NC, BC]
        diag += tl.where(col == b, val[:, :, None], 0.0)
    same = tl.arange(0, NC)[:, None, None, None] == tl.arange(0, NC)[None, None, :, None]
    blocks = tl.where(same, diag[:, :, None, :], 0.0)                                # [NC, BC, NC, BC]
    return out + tl.reshape(blocks, (BT, BT))


@triton.jit
def apply_anticausal(X, Y, G, BT: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """out[j, m] = sum_{i >= j} X[i, j] Y[i, m] exp(G[i, m] - G[j, m]); X [BT, BT] indexed [i, j]."""
    NC: tl.constexpr = BT // BC
    rows = tl.arange(0, BT)
    sub = rows // BC
    out = tl.zeros((BT, BM), dtype=tl.float32)
    for I in tl.static_range(1, NC):
        Gr = _row(G, rows, I * BC - 1)
        inside = (sub == I)[:, None]
        before = (rows < I * BC)[:, None]
        Yr = tl.where(inside, Y * tl.exp(tl.where(inside, G - Gr[None, :], 0.0)), 0.0)
        part = tl.dot(tl.trans(X), Yr, input_precision=PREC)
        out += tl.where(before, tl.exp(tl.where(before, Gr[None, :] - G, 0.0)) * part, 0.0)
    G3 = tl.reshape(G, (NC, BC, BM))
    Y3 = tl.reshape(Y, (NC, BC, BM))
    Xd = _diag_blocks(X, BT, BC)                                                     # [I, i_off, j_off]
    a = tl.arange(0, BC)[None, :, None]
    out3 = tl.zeros((NC, BC, BM), dtype=tl.float32)
    for b in tl.static_range(BC):
        Yb = _sub_rows(Y3, b, BC)
        Gb = _sub_rows(G3, b, BC)
        xb = tl.sum(tl.where((tl.arange(0, BC) == b)[None, :, None], Xd, 0.0), axis=1)  # X[i_b, j]
        valid = a <= b
        decay = tl.exp(tl.where(valid, Gb[:, None, :] - G3, 0.0))
        out3 += tl.where(valid, xb[:, :, None] * Yb[:, None, :] * decay, 0.0)
    return out + tl.reshape(out3, (BT, BM))
