"""gsa_kernels.kernels.dots (16-bit-halves dots, power-of-two scales), and what tf32 does to a dot.

On CUDA these check the GPU; in the interpreter they also check conftest's tf32 truncation, which the
precision tests of the half-input paths rely on to fail there as they would on the GPU.
"""
import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE, ON_GPU
from gsa_kernels.kernels import dots

HALF = [torch.float16] + ([torch.bfloat16] if ON_GPU else [])   # the interpreter's bf16 tl.dot is wrong


@triton.jit
def _dot_probe(A, B, OUT, acc0, R: tl.constexpr, C: tl.constexpr, N: tl.constexpr, WHICH: tl.constexpr):
    r, c, n = tl.arange(0, R), tl.arange(0, C), tl.arange(0, N)
    a = tl.load(A + r[:, None] * C + c[None, :])
    b = tl.load(B + c[:, None] * N + n[None, :])
    acc = tl.zeros((R, N), tl.float32) + acc0               # the accumulator must be added, once
    if WHICH == 0:
        out = tl.dot(a, b, acc, input_precision="tf32")
    elif WHICH == 1:
        out = dots.dot_acc(a, b, acc, "tf32")
    else:
        out = dots.dot_acc_scaled(a, b, acc, "tf32")
    tl.store(OUT + r[:, None] * N + n[None, :], out)


def _run(a, b, which, acc0=0.5):
    out = torch.full((a.shape[0], b.shape[1]), float("nan"), device=DEVICE)
    _dot_probe[(1,)](a, b, out, acc0, R=a.shape[0], C=a.shape[1], N=b.shape[1], WHICH=which)
    return out.double().cpu()


def test_tf32_dots_truncate():
    """1 + 3 * 2^-12 is 3/4 of the way from 1 to the next tf32 number (1 + 2^-10). Truncated it is 1,
    rounded to nearest 1 + 2^-10: a row of 16 of them times ones sums to 16 or 16 + 2^-6."""
    a = torch.full((16, 16), 1 + 3 * 2.0**-12, device=DEVICE)
    b = torch.ones(16, 16, device=DEVICE)
    out = _run(a, b, 0)
    assert torch.equal(out, torch.full_like(out, 16.5)), \
        f"tf32 dot gave {out.unique().tolist()}, truncation gives 16.5 (16 + the accumulator's 0.5)"


def _rel(got, want):
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_halves_dots_keep_16_bits_of_the_float32_operand(dtype):
    """a (16-bit, exact) @ b (float32): the halves keep 16 (bf16) / 22 (fp16) significant bits of b,
    where tf32 keeps 11; both operand orders."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(32, 64, generator=gen).to(dtype)
    b = torch.randn(64, 16, generator=gen)
    want = a.double() @ b.double() + 0.5
    bound = {torch.float16: 2e-6, torch.bfloat16: 5e-5}[dtype]
    tf32 = _rel(_run(a.float().to(DEVICE), b.to(DEVICE), 0), want)
    assert tf32 > 4 * bound, f"tf32 error {tf32:.1e}: the probe cannot tell the halves from tf32"
    for got in (_run(a.to(DEVICE), b.to(DEVICE), 1), _run(a.to(DEVICE), b.to(DEVICE), 2)):
        assert _rel(got, want) < bound, f"{dtype}: error {_rel(got, want):.1e} over {bound:.0e}"
    # the float32 operand on the left: b^T [16, 64] @ a^T [64, 32]
    got = _run(b.T.contiguous().to(DEVICE), a.T.contiguous().to(DEVICE), 1)
    want = b.T.double() @ a.T.double() + 0.5
    assert _rel(got, want) < bound, f"{dtype}, float32 on the left: error {_rel(got, want):.1e}"


@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1e6, 1e30])
def test_scaled_halves_take_float32_magnitudes_in_float16(magnitude):
    """float16 halves of a state past 65504 (or below float16's subnormals) would be inf (or 0): the
    scaled split keeps 22 bits at any float32 magnitude; the plain split overflows."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(32, 64, generator=gen).to(torch.float16)
    b = torch.randn(64, 16, generator=gen) * magnitude
    want = a.double() @ b.double()
    got = _run(a.to(DEVICE), b.to(DEVICE), 2, acc0=0.0)
    assert _rel(got, want) < 2e-6, f"|b| ~ {magnitude:.0e}: error {_rel(got, want):.1e}"
    plain = _run(a.to(DEVICE), b.to(DEVICE), 1, acc0=0.0)
    if magnitude > 65504:
        assert not torch.isfinite(plain).all(), "the plain split stayed finite past float16's range"
    else:
        assert _rel(plain, want) > 1e-3, "the plain split kept float16's subnormals: scaling not needed?"


@triton.jit
def _scale_probe(X, SCALE, INVERSE, N: tl.constexpr):
    i = tl.arange(0, N)
    scale, inverse = dots.pow2_scale(tl.load(X + i))
    tl.store(SCALE + i, scale)
    tl.store(INVERSE + i, inverse)


def test_pow2_scale():
    """A power of two in (amax / 2, amax] and its exact inverse; 1 for zero and subnormal amax, 2^126
    from 2^127 up (inf included: x * inverse stays inf)."""
    x = torch.tensor([1.0, 1.5, 3.0, 65504.0, 2.0**100, 2.0**-126, 1.2e-38, 1e-45, 0.0, 7e-3,
                      2.0**-100, 123456.0, 0.75, 1e30, 2.0**127, float('inf')], dtype=torch.float32, device=DEVICE)
    scale, inverse = torch.empty_like(x), torch.empty_like(x)
    _scale_probe[(1,)](x, scale, inverse, N=x.numel())
    x, scale, inverse = x.double().cpu(), scale.double().cpu(), inverse.double().cpu()
    normal, top = x >= 2.0**-126, x >= 2.0**127
    assert torch.equal(scale[~normal], torch.ones_like(scale[~normal]))
    assert torch.equal(inverse[~normal], torch.ones_like(inverse[~normal]))
    assert (scale[top] == 2.0**126).all() and (inverse[top] == 2.0**-126).all()
    normal &= ~top
    xs, ss = x[normal], scale[normal]
    assert ((xs / 2 < ss) & (ss <= xs)).all(), f"scales {ss.tolist()} for {xs.tolist()}"
    assert torch.equal(ss * inverse[normal], torch.ones_like(ss)), "inverse not exact"
    assert torch.equal(torch.log2(ss), torch.log2(ss).round()), "scale not a power of two"
