"""Intra-chunk products with a per-slot decay: the three shapes that GSA's forward and backward need.

Inside a chunk of BT rows, with G the within-chunk cumulative sum of the log gate (per slot, so G is
non-increasing down the rows), every intra-chunk term of GSA is one of

    apply_causal     out[i, m] = sum_{j <= i} X[i, j] * Y[j, m] * exp(G[i, m] - G[j, m])   [BT, BM]
    matrix_causal    out[i, j] = sum_m        X[i, m] * Y[j, m] * exp(G[i, m] - G[j, m])   [BT, BT], j <= i
    apply_anticausal out[j, m] = sum_{i >= j} X[i, j] * Y[i, m] * exp(G[i, m] - G[j, m])   [BT, BM]

The decay depends on (i, j, m) together, so it cannot be folded into one matmul without a positive
exponent somewhere (exp(-G[j]) overflows once the chunk has forgotten more than e^-88). We split the
chunk into NC = BT / BC sub-chunks:
  * a pair (i, j) in different sub-chunks goes through the row r = I * BC - 1 just before the later
    sub-chunk I:  exp(G[i] - G[j]) = exp(G[i] - G[r]) * exp(G[r] - G[j]), both factors <= 1, so the
    sum over the earlier rows is a tensor-core dot;
  * a pair in the same sub-chunk is done exactly, one in-sub-chunk offset b at a time: every row
    reads "its" partner row (sub-chunk start + b) of Y and G straight from memory (an L1 hit), so no
    register tensor is ever sliced or reshaped. Every exponent is masked to <= 0 before exp.

Y and G are passed twice: as [BT, BM] register tensors (this chunk's rows) and as pointers to the
chunk's row 0 with a row stride, for the gathered partner rows. Rows at or past `nvalid` read Y = 0
and the last valid G (g = 0 past the end), and slots past M read 0, so nothing padded is inf or NaN.
PREC is the tl.dot input precision of float32 operands ("ieee" for float32 inputs, else "tf32").
The loops are runtime loops on purpose: unrolled, the compiler hoists every iteration's gathers at
once and the chunk kernels spill (measured on the H100, docs/perf-notes.md).
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
def _gate_row(g_ptr, r, stride, nvalid, M, BM: tl.constexpr):
    m = tl.arange(0, BM)
    return tl.load(g_ptr + tl.minimum(r, nvalid - 1) * stride + m, mask=m < M, other=0.0)


@triton.jit
def apply_causal(X, Y, G, y_ptr, y_stride, g_ptr, g_stride, nvalid, M,
                 BT: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """out[i, m] = sum_{j <= i} X[i, j] Y[j, m] exp(G[i, m] - G[j, m]); X [BT, BT], Y and G [BT, BM]."""
    NC: tl.constexpr = BT // BC
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    sub = rows // BC
    out = tl.zeros((BT, BM), dtype=tl.float32)
    for I in range(1, NC):
        Gr = _gate_row(g_ptr, I * BC - 1, g_stride, nvalid, M, BM)
        before = (rows < I * BC)[:, None]
        Yr = tl.where(before, Y * tl.exp(tl.where(before, Gr[None, :] - G, 0.0)), 0.0)
        part = tl.dot(X, Yr, input_precision=PREC)
        inside = (sub == I)[:, None]
        out += tl.where(inside, tl.exp(tl.where(inside, G - Gr[None, :], 0.0)) * part, 0.0)
    for b in range(BC):
        j = sub * BC + b
        valid = ((rows % BC) >= b)[:, None]
        yj = load_rows(y_ptr, j, y_stride, nvalid, M, BM)
        gj = load_gates(g_ptr, j, g_stride, nvalid, M, BM)
        xj = tl.sum(tl.where(cols[None, :] == j[:, None], X, 0.0), axis=1)
        out += tl.where(valid, xj[:, None] * yj * tl.exp(tl.where(valid, G - gj, 0.0)), 0.0)
    return out


@triton.jit
def matrix_causal(X, Y, G, y_ptr, y_stride, g_ptr, g_stride, nvalid, M,
                  BT: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """out[i, j] = sum_m X[i, m] Y[j, m] exp(G[i, m] - G[j, m]) for j <= i, else 0; [BT, BT]."""
    NC: tl.constexpr = BT // BC
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    sub = rows // BC
    out = tl.zeros((BT, BT), dtype=tl.float32)
    for I in range(1, NC):
        Gr = _gate_row(g_ptr, I * BC - 1, g_stride, nvalid, M, BM)
        inside = (sub == I)[:, None]
        before = (rows < I * BC)[:, None]
        Xr = tl.where(inside, X * tl.exp(tl.where(inside, G - Gr[None, :], 0.0)), 0.0)
        Yr = tl.where(before, Y * tl.exp(tl.where(before, Gr[None, :] - G, 0.0)), 0.0)
        out += tl.dot(Xr, tl.trans(Yr), input_precision=PREC)
    for b in range(BC):
        j = sub * BC + b
        valid = ((rows % BC) >= b)[:, None]
        yj = load_rows(y_ptr, j, y_stride, nvalid, M, BM)
        gj = load_gates(g_ptr, j, g_stride, nvalid, M, BM)
        val = tl.sum(tl.where(valid, X * yj * tl.exp(tl.where(valid, G - gj, 0.0)), 0.0), axis=1)
        out += tl.where(cols[None, :] == j[:, None], val[:, None], 0.0)
    return out


@triton.jit
def apply_anticausal(X, Y, G, y_ptr, y_stride, g_ptr, g_stride, nvalid, M,
                     BT: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """out[j, m] = sum_{i >= j} X[i, j] Y[i, m] exp(G[i, m] - G[j, m]); X [BT, BT] indexed [i, j]."""
    NC: tl.constexpr = BT // BC
    rows = tl.arange(0, BT)
    cols = tl.arange(0, BT)
    sub = rows // BC
    Xt = tl.trans(X)                                     # Xt[j, i]: row-wise picks stay inside a warp
    out = tl.zeros((BT, BM), dtype=tl.float32)
    for I in range(1, NC):
        Gr = _gate_row(g_ptr, I * BC - 1, g_stride, nvalid, M, BM)
        inside = (sub == I)[:, None]
        before = (rows < I * BC)[:, None]
        Yr = tl.where(inside, Y * tl.exp(tl.where(inside, G - Gr[None, :], 0.0)), 0.0)
        part = tl.dot(Xt, Yr, input_precision=PREC)
        out += tl.where(before, tl.exp(tl.where(before, Gr[None, :] - G, 0.0)) * part, 0.0)
    for b in range(BC):
        i = sub * BC + b
        valid = ((rows % BC) <= b)[:, None]
        yi = load_rows(y_ptr, i, y_stride, nvalid, M, BM)
        gi = load_gates(g_ptr, i, g_stride, nvalid, M, BM)
        xi = tl.sum(tl.where(cols[None, :] == i[:, None], Xt, 0.0), axis=1)
        out += tl.where(valid, xi[:, None] * yi * tl.exp(tl.where(valid, gi - G, 0.0)), 0.0)
    return out
