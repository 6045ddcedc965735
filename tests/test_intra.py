"""The intra-chunk helpers of gsa_kernels.kernels.intra against their float64 definitions."""
import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE
from gsa_kernels.kernels import intra


@triton.jit
def _intra_probe(X, Y, Y2, G, OUT_APPLY, OUT_MATRIX, OUT_ANTI,
                 BT: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    r = tl.arange(0, BT)
    m = tl.arange(0, BM)
    x = tl.load(X + r[:, None] * BT + r[None, :])
    y = tl.load(Y + r[:, None] * BM + m[None, :])
    gg = tl.load(G + r[:, None] * BM + m[None, :])
    # the helpers gather reference rows of G from memory: pass the same tile as a pointer too
    out = intra.apply_causal(x, y, gg, G, BM, BT, BM, BT, BM, PREC)
    tl.store(OUT_APPLY + r[:, None] * BM + m[None, :], out)
    out = intra.apply_anticausal(x, y, gg, G, BM, BT, BM, BT, BM, PREC)
    tl.store(OUT_ANTI + r[:, None] * BM + m[None, :], out)
    y2 = tl.load(Y2 + r[:, None] * BM + m[None, :])
    out = intra.matrix_causal(y, y2, gg, G, BM, BT, BM, BT, BM, PREC)
    tl.store(OUT_MATRIX + r[:, None] * BT + r[None, :], out)


def _expected(x, y, gcum):
    d = gcum[:, None, :] - gcum[None, :, :]                      # [i, j, m] = G_i - G_j
    causal = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool).tril()
    decay = torch.where(causal[:, :, None], d, torch.full_like(d, -torch.inf)).exp()
    apply = torch.einsum('ij,jm,ijm->im', x, y, decay)
    anti = torch.einsum('ij,im,ijm->jm', x, y, decay)
    matrix = torch.einsum('im,jm,ijm->ij', y, y * 0.5 + 1.0, decay)
    return apply, matrix, anti


@pytest.mark.parametrize("BT,BM", [(16, 16), (32, 16), (64, 32), (128, 16)], ids=lambda v: str(v))
@pytest.mark.parametrize("gate", ["model", "steep"])
def test_intra_helpers_match_definition(BT, BM, gate):
    torch.manual_seed(BT * 7 + BM)
    x = torch.randn(BT, BT, dtype=torch.float64)
    y = torch.randn(BT, BM, dtype=torch.float64)
    if gate == "model":
        g = torch.nn.functional.logsigmoid(torch.randn(BT, BM, dtype=torch.float64)) / 8
    else:
        g = -30 * torch.rand(BT, BM, dtype=torch.float64)
        g[:, 0] = 0.0                                           # a slot that never forgets
    dev = dict(device=DEVICE, dtype=torch.float32)
    xd, yd, gd = x.to(**dev), y.to(**dev), g.cumsum(0).to(**dev)
    # the reference sees the same float32-rounded inputs as the kernel
    want = _expected(xd.double().cpu(), yd.double().cpu(), gd.double().cpu())
    outs = [torch.full((BT, BM), float('nan'), **dev), torch.full((BT, BT), float('nan'), **dev),
            torch.full((BT, BM), float('nan'), **dev)]
    _intra_probe[(1,)](xd, yd, yd * 0.5 + 1.0, gd, *outs, BT=BT, BM=BM, PREC="ieee")
    for name, got, ref in zip(["apply_causal", "matrix_causal", "apply_anticausal"], outs, want):
        err = ((got.double().cpu() - ref).norm() / ref.norm()).item()
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


def test_intra_probe_matches_definition():
    """benchmarks/intra_probe.py times the slot work split out of the chunk kernels: it must compute
    that work (forward: scores, softmax, Av; backward: dA and the anticausal product)."""
    from benchmarks import intra_probe
    errors = intra_probe.check(DEVICE)
    assert max(errors.values()) < 1e-6, errors
