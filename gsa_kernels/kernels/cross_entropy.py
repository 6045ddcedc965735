"""Cross-entropy of one chunk of logits and its gradient, in place, one program per row.

    loss_i = logsumexp_v x_iv - x_{i y_i},     grad_iv = scale (softmax(x_i)_v - [v = y_i])

The logits arrive in 16 bits from the head's GEMM. The plain form converts them to float32 and
makes several float32 passes (logsumexp, subtract, exp, scatter, scale, round): ~18 bytes moved per
logit. Here a row is read twice (an online max and sum, then the gradient) and the gradient
overwrites the logits in their own dtype: 6 bytes per logit, and no float32 copy of the chunk.
A row whose label is ignore_index has loss 0 and gradient 0; a label outside [0, V) gives a NaN
loss, so that a wrong label is never silently scored.
"""
import triton
import triton.language as tl


@triton.jit
def cross_entropy_kernel(logits, labels, loss, scale, V, stride, ignore_index,
                         WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits + row * stride
    y = tl.load(labels + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    # pass 1: the running max m and the sum of exp(x - m) over the row
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    for start in range(0, V, BLOCK):
        x = tl.load(x_row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    ignored = y == ignore_index
    in_range = (y >= 0) & (y < V)
    target = tl.load(x_row + tl.where(in_range, y, 0)).to(tl.float32)
    row_loss = tl.where(in_range, lse - target, float("nan"))
    tl.store(loss + row, tl.where(ignored, 0.0, row_loss))
    if WRITE_GRAD:
        # pass 2: the gradient, written over the logits (the target was read above)
        w = tl.where(ignored, 0.0, tl.load(scale))
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(start + cols == y, 1.0, 0.0)
            tl.store(x_row + start + cols, (p * w).to(logits.dtype.element_ty), mask=mask)
