"""RMSNorm over the last dim, y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), in float32 inside;
with SILU the norm is of silu(x) (the GSA layer's output path), taken in float32 from x.

The plain PyTorch form runs about six launches each way and keeps float32 copies of x for the
backward (four bytes per element of every norm's input, in a model whose activations are two). Here
the forward is one launch that saves only rstd (one float per row); the backward recomputes x * rstd
from x and is one launch plus a sum of the weight gradient's per-program shares.

    forward   program i: rows i, i + P, ... (P programs), each row in one [BLOCK] tile
    backward  dx = rstd * (dy w - x_hat * mean(dy w x_hat)),  x_hat = x * rstd
              dw = sum over rows of dy * x_hat: each program sums its rows in float32 into one share
    SILU      x above is silu(x) recomputed from x; the backward ends with dx *= silu'(x)
"""
import triton
import triton.language as tl


@triton.jit
def rms_norm_fwd_kernel(x, w, y, rstd, rows, N, eps, BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                        SILU: tl.constexpr):
    p, P = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if HAS_WEIGHT:
        wt = tl.load(w + cols, mask=mask, other=0.0).to(tl.float32)
    base = p.to(tl.int64) * N      # the row's offset, in 64 bits: rows * N may pass 2^31
    for r in range(p, rows, P):
        xt = tl.load(x + base + cols, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            xt = xt * tl.sigmoid(xt)
        inv = 1.0 / tl.sqrt(tl.sum(xt * xt, 0) / N + eps)
        out = xt * inv
        if HAS_WEIGHT:
            out = out * wt
        tl.store(y + base + cols, out.to(y.dtype.element_ty), mask=mask)
        tl.store(rstd + r, inv)
        base += P.to(tl.int64) * N


@triton.jit
def rms_norm_bwd_kernel(x, w, dy, rstd, dx, dw_share, rows, N, BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                        SILU: tl.constexpr):
    p, P = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if HAS_WEIGHT:
        wt = tl.load(w + cols, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    base = p.to(tl.int64) * N
    for r in range(p, rows, P):
        xt = tl.load(x + base + cols, mask=mask, other=0.0).to(tl.float32)
        dyt = tl.load(dy + base + cols, mask=mask, other=0.0).to(tl.float32)
        inv = tl.load(rstd + r)
        if SILU:
            sig = tl.sigmoid(xt)
            x_hat = xt * sig * inv
        else:
            x_hat = xt * inv
        g = dyt
        if HAS_WEIGHT:
            acc += dyt * x_hat
            g = dyt * wt
        dxt = inv * (g - x_hat * (tl.sum(g * x_hat, 0) / N))
        if SILU:
            dxt = dxt * sig * (1.0 + xt * (1.0 - sig))
        tl.store(dx + base + cols, dxt.to(dx.dtype.element_ty), mask=mask)
        base += P.to(tl.int64) * N
    if HAS_WEIGHT:
        tl.store(dw_share + p * N + cols, acc, mask=mask)
