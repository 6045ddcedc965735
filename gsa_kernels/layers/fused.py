"""The layers' elementwise and norm work as one Triton launch each way, with their autograd:

    rms_norm          RMSNorm, optionally of silu(x) (the GSA output path)        kernels/rms_norm.py
    rms_norm_linear   a norm and the projections that read it; the normed tensor is recomputed in
                      the backward instead of kept: a pre-norm block's q/k/v/f or gate/up
                      projections, the GSA output's silu-norm-o_proj (32 MB a use at 8192 tokens x
                      2048 channels, bf16)
    silu_mul          SwiGLU's product                                            kernels/silu_mul.py
    silu_mul_linear   that product and the down projection; the product is recomputed in the
                      backward (92 MB per layer at 8192 x 5632)
    gates             the GSA gates s, g from the forget projection               kernels/gates.py

Each takes the fused path on CUDA tensors in eager mode, and the plain PyTorch form under
torch.compile (Inductor fuses that form itself, and a graph stays whole) and on other devices. The
`*_fused` forms always take the kernels: the tests run them in Triton's interpreter against float64
and the plain forms. Results: float32 inside, one rounding to the output's dtype at the end (the
plain forms round silu(a) or silu(x) to the input's dtype first).

Written here rather than taken from Liger-Kernel (which has a fused norm and SwiGLU): these are
short kernels, the tests run them in Triton's interpreter on a CPU (Liger's kernels do not run
there), and no dependency is added.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gsa_kernels.configs import num_sms
from gsa_kernels.intmath import cdiv, next_pow2
from gsa_kernels.kernels.gates import gates_bwd_kernel, gates_fwd_kernel
from gsa_kernels.kernels.rms_norm import rms_norm_bwd_kernel, rms_norm_fwd_kernel
from gsa_kernels.kernels.silu_mul import silu_mul_bwd_kernel, silu_mul_fwd_kernel

ELEMENTWISE_BLOCK = 1024


def _norm_launch(rows: int, N: int):
    """(programs, num_warps): a row per [BLOCK] tile, programs walking rows; enough programs for a
    few per SM, more warps for wide rows."""
    BLOCK = next_pow2(N)
    return min(rows, 4 * num_sms()), max(1, min(16, BLOCK // 256))


def _rms_norm_fwd(x2, weight, eps, silu):
    rows, N = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2.device)
    if rows:
        programs, warps = _norm_launch(rows, N)
        rms_norm_fwd_kernel[(programs,)](x2, weight if weight is not None else x2, y, rstd, rows, N, eps,
                                         BLOCK=next_pow2(N), HAS_WEIGHT=weight is not None, SILU=silu,
                                         num_warps=warps)
    return y, rstd


def _rms_norm_bwd(x2, weight, rstd, dy2, silu):
    rows, N = x2.shape
    dx = torch.empty_like(x2)
    dw = None
    if rows:
        programs, warps = _norm_launch(rows, N)
        share = torch.empty(programs, N, dtype=torch.float32, device=x2.device) if weight is not None else dx
        rms_norm_bwd_kernel[(programs,)](x2, weight if weight is not None else x2, dy2.contiguous(), rstd, dx, share,
                                         rows, N, BLOCK=next_pow2(N), HAS_WEIGHT=weight is not None, SILU=silu,
                                         num_warps=warps)
        if weight is not None:
            dw = share.sum(0).to(weight.dtype)
    elif weight is not None:
        dw = torch.zeros_like(weight)
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, silu):
        x2 = x.contiguous().view(-1, x.shape[-1])
        y, rstd = _rms_norm_fwd(x2, weight, eps, silu)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape, ctx.silu = x.shape, silu
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd(x2, weight, rstd, dy.reshape(x2.shape), ctx.silu)
        return dx.view(ctx.shape), dw, None, None


class RMSNormLinearFunction(torch.autograd.Function):
    """F.linear(norm(x), W) for each W of `weights`, keeping x and rstd for the backward and computing
    norm(x) again there: the normed [tokens, hidden] tensor, which every projection would otherwise
    keep, is not held between forward and backward (one more norm launch in the backward)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, eps, silu, *weights):
        x2 = x.contiguous().view(-1, x.shape[-1])
        y, rstd = _rms_norm_fwd(x2, weight, eps, silu)
        ctx.save_for_backward(x2, weight, rstd, *weights)
        ctx.shape, ctx.eps, ctx.silu = x.shape, eps, silu
        ctx.set_materialize_grads(False)   # an unused projection's gradient stays None: no zeros multiplied
        y = y.view(x.shape)
        return tuple(F.linear(y, W) for W in weights)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *douts):
        x2, weight, rstd, *weights = ctx.saved_tensors
        y = dy = None
        dweights = []
        for W, dout, needs in zip(weights, douts, ctx.needs_input_grad[4:]):
            if dout is None:
                dweights.append(None)
                continue
            dout = dout.reshape(-1, dout.shape[-1])
            if needs:
                if y is None:
                    y, _ = _rms_norm_fwd(x2, weight, ctx.eps, ctx.silu)
                dweights.append((dout.T @ y).to(W.dtype))
            else:
                dweights.append(None)
            dy = dout @ W.to(dout.dtype) if dy is None else dy.addmm_(dout, W.to(dout.dtype))
        if dy is None:
            return None, None, None, None, *dweights
        dx, dw = _rms_norm_bwd(x2, weight, rstd, dy, ctx.silu)
        return dx.view(ctx.shape), dw, None, None, *dweights


def _silu_mul_fwd(a, b):
    y = torch.empty_like(a)
    n = a.numel()
    if n:
        silu_mul_fwd_kernel[(cdiv(n, ELEMENTWISE_BLOCK),)](a, b, y, n, BLOCK=ELEMENTWISE_BLOCK, num_warps=4)
    return y


def _silu_mul_bwd(a, b, dy):
    dy = dy.contiguous()
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    if n:
        silu_mul_bwd_kernel[(cdiv(n, ELEMENTWISE_BLOCK),)](a, b, dy, da, db, n, BLOCK=ELEMENTWISE_BLOCK, num_warps=4)
    return da, db


class SiLUMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        return _silu_mul_fwd(a, b)

    @staticmethod
    def backward(ctx, dy):
        return _silu_mul_bwd(*ctx.saved_tensors, dy)


class SiLUMulLinearFunction(torch.autograd.Function):
    """F.linear(silu(a) * b, weight) that keeps a and b for the backward and computes the product again
    there: the product, a [tokens, intermediate] tensor, is not held between forward and backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, a, b, weight):
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b, weight)
        return F.linear(_silu_mul_fwd(a, b), weight)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        a, b, weight = ctx.saved_tensors
        dweight = None
        if ctx.needs_input_grad[2]:
            y = _silu_mul_fwd(a, b)
            dweight = (dout.reshape(-1, dout.shape[-1]).T @ y.reshape(-1, y.shape[-1])).to(weight.dtype)
        da, db = _silu_mul_bwd(a, b, dout @ weight.to(dout.dtype))
        return da, db, dweight


class GatesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, normalizer, dtype):
        f = f.contiguous()
        s, g = torch.empty_like(f, dtype=dtype), torch.empty_like(f, dtype=dtype)
        n = f.numel()
        if n:
            gates_fwd_kernel[(cdiv(n, ELEMENTWISE_BLOCK),)](f, s, g, n, normalizer, BLOCK=ELEMENTWISE_BLOCK,
                                                            num_warps=4)
        ctx.save_for_backward(f)
        ctx.normalizer = normalizer
        return s, g

    @staticmethod
    def backward(ctx, ds, dg):
        (f,) = ctx.saved_tensors
        df = torch.empty_like(f)
        n = f.numel()
        if n:
            gates_bwd_kernel[(cdiv(n, ELEMENTWISE_BLOCK),)](f, ds.contiguous(), dg.contiguous(), df, n, ctx.normalizer,
                                                            BLOCK=ELEMENTWISE_BLOCK, num_warps=4)
        return df, None, None


def gates_plain(f, normalizer, dtype):
    g = F.logsigmoid(f.float()) / normalizer
    return (1 - g.exp()).to(dtype), g.to(dtype)


def gates_fused(f, normalizer, dtype):
    return GatesFunction.apply(f, normalizer, dtype)


def rms_norm_plain(x, weight, eps, silu=False):
    if silu:
        x = F.silu(x)
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def rms_norm_fused(x, weight, eps, silu=False):
    return RMSNormFunction.apply(x, weight, eps, silu)


def rms_norm_linear_fused(x, weight, eps, weights, silu=False):
    return RMSNormLinearFunction.apply(x, weight, eps, silu, *weights)


def silu_mul_fused(a, b):
    return SiLUMulFunction.apply(a, b)


def silu_mul_linear_fused(a, b, weight):
    return SiLUMulLinearFunction.apply(a, b, weight)


def _fused_here(x) -> bool:
    return x.is_cuda and not torch.compiler.is_compiling()


def rms_norm(x, weight, eps, silu=False):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim (weight may be None), in x's dtype; with
    silu, of silu(x)."""
    if _fused_here(x):
        return rms_norm_fused(x, weight, eps, silu)
    return rms_norm_plain(x, weight, eps, silu)


def rms_norm_linear(x, weight, eps, weights, silu=False):
    """(F.linear(y, W) for W in weights) with y = rms_norm(x, weight, eps, silu): a pre-norm block's
    projections, or the GSA layer's output norm and o_proj. Fused, y is recomputed in the backward
    instead of saved."""
    if _fused_here(x):
        return rms_norm_linear_fused(x, weight, eps, weights, silu)
    y = rms_norm(x, weight, eps, silu)
    return tuple(F.linear(y, W) for W in weights)


def gates(f, normalizer, dtype):
    """(s, g) in dtype: g = logsigmoid(f) / normalizer, s = 1 - exp(g) (kernels/gates.py), computed in
    float32 and rounded once."""
    if _fused_here(f):
        return gates_fused(f, float(normalizer), dtype)
    return gates_plain(f, normalizer, dtype)


def silu_mul(a, b):
    """silu(a) * b."""
    if _fused_here(a) and a.shape == b.shape and a.dtype == b.dtype:
        return silu_mul_fused(a, b)
    return F.silu(a) * b


def silu_mul_linear(a, b, weight):
    """F.linear(silu(a) * b, weight) (SwiGLU's down projection); fused, the product is recomputed in the
    backward instead of saved."""
    if _fused_here(a) and a.shape == b.shape and a.dtype == b.dtype:
        return silu_mul_linear_fused(a, b, weight)
    return F.linear(silu_mul(a, b), weight)
