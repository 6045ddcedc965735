"""The layers' fused RMSNorm and SwiGLU product (layers/fused.py) against float64, forward and every
gradient, by relative L2 error: float32 within 1e-5, half precision within one rounding of the
output (the plain PyTorch forms are held to the same bound on the same inputs)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, ON_GPU
from gsa_kernels.layers import fused
from test_chunk import rel_err

BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NORM_SHAPES = [(3, 5, 48), (7, 100), (1, 1, 16)]            # N not a power of two, a single row
if ON_GPU:
    NORM_SHAPES += [(4, 2048, 2048), (8192, 512)]


def _leaves(*shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]


def _grads(fn, inputs, dtype, dy):
    xs = [x.detach().to(DEVICE, dtype).clone().requires_grad_() for x in inputs]
    y = fn(*xs)
    y.backward(dy.to(DEVICE, dtype))
    return [y] + [x.grad for x in xs]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "no-weight"])
def test_rms_norm_matches_float64(shape, affine, dtype):
    N = shape[-1]
    x, dy, w = _leaves(shape, shape, (N,), seed=sum(shape))
    w = 1 + 0.5 * w
    eps = 1e-6
    if affine:
        ref = _grads(lambda x, w: fused.rms_norm_plain(x, w, eps), [x, w], torch.float64, dy)
        got = _grads(lambda x, w: fused.rms_norm_fused(x, w, eps), [x, w], dtype, dy)
        plain = _grads(lambda x, w: fused.rms_norm_plain(x, w, eps), [x, w], dtype, dy)
    else:
        ref = _grads(lambda x: fused.rms_norm_plain(x, None, eps), [x], torch.float64, dy)
        got = _grads(lambda x: fused.rms_norm_fused(x, None, eps), [x], dtype, dy)
        plain = _grads(lambda x: fused.rms_norm_plain(x, None, eps), [x], dtype, dy)
    assert got[0].dtype == dtype and got[0].shape == shape
    for name, g, p, r in zip(["y", "dx", "dw"], got, plain, ref):
        err = rel_err(g, r)
        assert err <= max(BOUND[dtype], 1.5 * rel_err(p, r)), (name, err, rel_err(p, r))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 40), (2049,)] + ([(8, 2048, 5632)] if ON_GPU else []), ids=str)
def test_silu_mul_matches_float64(shape, dtype):
    a, b, dy = _leaves(shape, shape, shape, seed=len(shape) + shape[-1])
    ref = _grads(lambda a, b: F.silu(a) * b, [a, b], torch.float64, dy)
    got = _grads(fused.silu_mul_fused, [a, b], dtype, dy)
    plain = _grads(lambda a, b: F.silu(a) * b, [a, b], dtype, dy)
    assert got[0].dtype == dtype and got[0].shape == shape
    for name, g, p, r in zip(["y", "da", "db"], got, plain, ref):
        err = rel_err(g, r)
        assert err <= max(BOUND[dtype], 1.5 * rel_err(p, r)), (name, err, rel_err(p, r))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 40, 24), (2049, 16)] + ([(4, 2048, 5632, 2048)] if ON_GPU else []),
                         ids=str)
def test_silu_mul_linear_matches_float64(shape, dtype):
    """down(silu(a) * b) with the product recomputed in the backward: output and the gradients of a, b
    and the weight."""
    *lead, inter, out = shape
    a, b, dy = _leaves((*lead, inter), (*lead, inter), (*lead, out), seed=inter + out)
    (w,) = _leaves((out, inter), seed=out)
    w = w / inter ** 0.5

    def plain(a, b, w):
        return F.linear(F.silu(a) * b, w)
    ref = _grads(plain, [a, b, w], torch.float64, dy)
    got = _grads(fused.silu_mul_linear_fused, [a, b, w], dtype, dy)
    base = _grads(plain, [a, b, w], dtype, dy)
    assert got[0].dtype == dtype and got[0].shape == (*lead, out)
    for name, g, p, r in zip(["y", "da", "db", "dw"], got, base, ref):
        err = rel_err(g, r)
        assert err <= max(BOUND[dtype], 1.5 * rel_err(p, r)), (name, err, rel_err(p, r))


def test_layers_take_the_fused_path_on_cuda_in_eager_only(monkeypatch):
    """RMSNorm and SwiGLU call the kernels on CUDA tensors outside torch.compile, the plain forms
    elsewhere."""
    from gsa_kernels.layers.block import SwiGLU
    from gsa_kernels.layers.norms import RMSNorm
    calls = []
    monkeypatch.setattr(fused, "rms_norm_fused", lambda *a: calls.append("norm") or fused.rms_norm_plain(*a))
    monkeypatch.setattr(fused, "silu_mul_linear_fused",
                        lambda a, b, w: calls.append("silu_mul_linear") or F.linear(F.silu(a) * b, w))
    x = torch.randn(2, 3, 16, device=DEVICE)
    RMSNorm(16).to(DEVICE)(x)
    SwiGLU(16, intermediate_size=8).to(DEVICE)(x)
    assert calls == (["norm", "silu_mul_linear"] if x.is_cuda else [])
