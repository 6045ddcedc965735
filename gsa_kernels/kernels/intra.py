"""Intra-chunk products with a per-slot decay: the three shapes that GSA's forward and backward need.

Inside a chunk of BT rows, with G the within-chunk cumulative sum of the log gate (per slot, so G is
non-increasing down the rows), every intra-chunk term of GSA is one of

    apply_causal     out[i, m] = sum_{j <= i} X[i, j] * Y[j, m] * exp(G[i, m] - G[j, m])   [BT, BM]
    matrix_causal    out[i, j] = sum_m        X[i, m] * Y[j, m] * exp(G[i, m] - G[j, m])   [BT, BT], j <= i
    apply_anticausal out[j, m] = sum_{i >= j} X[i, j] * Y[i, m] * exp(G[i, m] - G[j, m])   [BT, BM]

The decay depends on (i, j, m) together, so it cannot be folded into one matmul without a positive
exponent somewhere (exp(-G[j]) overflows once the chunk has forgotten more than e^-88). We split the
pairs by halving: at level S (S = 1, 2, 4, ..., BT / 2) the rows fall into blocks of 2S, each an
early half and a late half, and the level takes the pairs (i late, j early) of the same block. Every
pair j < i is split at exactly one level (the highest bit where i and j differ), and i = j is the
diagonal. Through r, the last row of the early half:

    exp(G[i] - G[j]) = exp(G[i] - G[r]) * exp(G[r] - G[j]),   both exponents <= 0,

so a level is one tensor-core dot between the rows scaled by E = exp(-|G - G[r]|) (one exp per
element and level), with no positive exponent and no per-row gathers of partner rows: log2(BT)
dots and log2(BT) exps of [BT, BM] per helper call. The G[r] rows are gathered from memory (an L1
hit: the chunk's G was just read), through g_ptr (the chunk's row 0) with a row stride; rows at or
past `nvalid` read the last valid row (G is flat past the sequence end), slots past M read 0.
PREC is the tl.dot input precision of float32 operands ("ieee" for float32 inputs, else "tf32").
"""
import triton
import triton.language as tl


@triton.jit
def load_rows(ptr, r, stride, nvalid, M, BM: tl.constexpr):
    """Rows r [BT] of a row-major [*, M] tile as float32 [BT, BM]; rows >= nvalid and slots >= M read 0."""
    m = tl.arange(0, BM)
    mask = (r < nvalid)[:, None] & (m < M)[None, :]
    return tl.load(ptr + r[:, None] * stride + m[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_gates(ptr, r, stride, nvalid, M, BM: tl.constexpr):
    """Rows r of G, clamped to the last valid row (G is flat past the end of the sequence)."""
    m = tl.arange(0, BM)
    rc = tl.minimum(r, nvalid - 1)
    return tl.load(ptr + rc[:, None] * stride + m[None, :], mask=(m < M)[None, :], other=0.0)


@triton.jit
def _level(G, g_ptr, g_stride, nvalid, M, S, BT: tl.constexpr, BM: tl.constexpr):
    """Level S: which rows are late (in the second half of their block of 2S), the same-block mask
    [BT, BT], and E = exp(G - G[r]) on late rows, exp(G[r] - G) on early rows (r: the block's
    last early row), both <= 1. The clamp only absorbs rounding of the parallel cumsum."""
    rows = tl.arange(0, BT)
    late = ((rows // S) % 2) == 1
    block = rows // (2 * S)
    same = block[:, None] == block[None, :]
    Gr = load_gates(g_ptr, block * (2 * S) + S - 1, g_stride, nvalid, M, BM)
    E = tl.exp(tl.minimum(tl.where(late[:, None], G - Gr, Gr - G), 0.0))
    return late[:, None], same, E


@triton.jit
def _diagonal(X, BT: tl.constexpr):
    """X[i, i] as a [BT] vector."""
    rows = tl.arange(0, BT)
    return tl.sum(tl.where(rows[:, None] == rows[None, :], X, 0.0), axis=1)


@triton.jit
def apply_causal(X, Y, G, g_ptr, g_stride, nvalid, M,
                 BT: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """out[i, m] = sum_{j <= i} X[i, j] Y[j, m] exp(G[i, m] - G[j, m]); X [BT, BT], Y and G [BT, BM]."""
    out = _diagonal(X, BT)[:, None] * Y
    S = 1
    while S < BT:
        late, same, E = _level(G, g_ptr, g_stride, nvalid, M, S, BT, BM)
        part = tl.dot(tl.where(same, X, 0.0), tl.where(late, 0.0, Y * E), input_precision=PREC)
        out += tl.where(late, E * part, 0.0)
        S *= 2
    return out


@triton.jit
def matrix_causal(X, Y, G, g_ptr, g_stride, nvalid, M,
                  BT: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """out[i, j] = sum_m X[i, m] Y[j, m] exp(G[i, m] - G[j, m]) for j <= i, else 0; [BT, BT]."""
    rows = tl.arange(0, BT)
    out = tl.where(rows[:, None] == rows[None, :], tl.sum(X * Y, axis=1)[:, None], 0.0)
    S = 1
    while S < BT:
        late, same, E = _level(G, g_ptr, g_stride, nvalid, M, S, BT, BM)
        part = tl.dot(tl.where(late, X * E, 0.0), tl.trans(tl.where(late, 0.0, Y * E)), input_precision=PREC)
        out += tl.where(same, part, 0.0)
        S *= 2
    return out


@triton.jit
def apply_anticausal(X, Y, G, g_ptr, g_stride, nvalid, M,
                     BT: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """out[j, m] = sum_{i >= j} X[i, j] Y[i, m] exp(G[i, m] - G[j, m]); X [BT, BT] indexed [i, j]."""
    Xt = tl.trans(X)
    out = _diagonal(X, BT)[:, None] * Y
    S = 1
    while S < BT:
        late, same, E = _level(G, g_ptr, g_stride, nvalid, M, S, BT, BM)
        part = tl.dot(tl.where(same, Xt, 0.0), tl.where(late, Y * E, 0.0), input_precision=PREC)
        out += tl.where(late, 0.0, E * part)
        S *= 2
    return out
