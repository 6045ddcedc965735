"""The GSA layer's gates from the forget projection f, elementwise in float32 inside:

    g = logsigmoid(f) / normalizer  (<= 0: each slot's log decay),   s = 1 - exp(g)  (its write weight)

The plain form is seven launches forward (a float32 copy of f, logsigmoid, the division, exp, the
subtraction, two roundings) and as many backward, on tensors of tokens x slots: small enough that
the launches, not the bytes, are its cost. Here each way is one launch; the forward saves f only and
the backward recomputes the sigmoid:

    dg_total = dg - ds * exp(g),   df = dg_total * sigmoid(-f) / normalizer
"""
import triton
import triton.language as tl


@triton.jit
def _log_decay(ft, normalizer):
    # logsigmoid(f) = min(f, 0) - log(1 + exp(-|f|)), finite for every finite f
    return (tl.minimum(ft, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(ft)))) / normalizer


@triton.jit
def gates_fwd_kernel(f, s, g, n, normalizer, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ft = tl.load(f + offs, mask=mask, other=0.0).to(tl.float32)
    gt = _log_decay(ft, normalizer)
    tl.store(g + offs, gt.to(g.dtype.element_ty), mask=mask)
    tl.store(s + offs, (1.0 - tl.exp(gt)).to(s.dtype.element_ty), mask=mask)


@triton.jit
def gates_bwd_kernel(f, ds, dg, df, n, normalizer, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ft = tl.load(f + offs, mask=mask, other=0.0).to(tl.float32)
    dst = tl.load(ds + offs, mask=mask, other=0.0).to(tl.float32)
    dgt = tl.load(dg + offs, mask=mask, other=0.0).to(tl.float32)
    total = dgt - dst * tl.exp(_log_decay(ft, normalizer))
    tl.store(df + offs, (total * tl.sigmoid(-ft) / normalizer).to(df.dtype.element_ty), mask=mask)
