"""SwiGLU's product, y = silu(a) * b, elementwise in float32 inside.

The plain form keeps silu(a) for the backward (one more activation-sized tensor per MLP) and runs
three launches forward and five backward. Here the forward is one launch and saves a and b only
(which the product needs anyway); the backward recomputes the sigmoid:

    da = dy * b * sig(a) * (1 + a * (1 - sig(a))),   db = dy * a * sig(a)
"""
import triton
import triton.language as tl


@triton.jit
def silu_mul_fwd_kernel(a, b, y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    at = tl.load(a + offs, mask=mask, other=0.0).to(tl.float32)
    bt = tl.load(b + offs, mask=mask, other=0.0).to(tl.float32)
    out = at * tl.sigmoid(at) * bt
    tl.store(y + offs, out.to(y.dtype.element_ty), mask=mask)


@triton.jit
def silu_mul_bwd_kernel(a, b, dy, da, db, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    at = tl.load(a + offs, mask=mask, other=0.0).to(tl.float32)
    bt = tl.load(b + offs, mask=mask, other=0.0).to(tl.float32)
    dyt = tl.load(dy + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(at)
    silu = at * sig
    tl.store(da + offs, (dyt * bt * sig * (1.0 + at * (1.0 - sig))).to(da.dtype.element_ty), mask=mask)
    tl.store(db + offs, (dyt * silu).to(db.dtype.element_ty), mask=mask)
