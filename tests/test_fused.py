"""The layers' fused norms, SwiGLU product and gates (layers/fused.py) against float64, forward and every
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
@pytest.mark.parametrize("silu", [False, True], ids=["norm", "silu-norm"])
def test_rms_norm_matches_float64(shape, affine, silu, dtype):
    N = shape[-1]
    x, dy, w = _leaves(shape, shape, (N,), seed=sum(shape))
    w = 1 + 0.5 * w
    eps = 1e-6
    if affine:
        ref = _grads(lambda x, w: fused.rms_norm_plain(x, w, eps, silu), [x, w], torch.float64, dy)
        got = _grads(lambda x, w: fused.rms_norm_fused(x, w, eps, silu), [x, w], dtype, dy)
        plain = _grads(lambda x, w: fused.rms_norm_plain(x, w, eps, silu), [x, w], dtype, dy)
    else:
        ref = _grads(lambda x: fused.rms_norm_plain(x, None, eps, silu), [x], torch.float64, dy)
        got = _grads(lambda x: fused.rms_norm_fused(x, None, eps, silu), [x], dtype, dy)
        plain = _grads(lambda x: fused.rms_norm_plain(x, None, eps, silu), [x], dtype, dy)
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("outs, silu", [((24,), True), ((24, 8, 40), False)], ids=["o_proj", "projections"])
@pytest.mark.parametrize("lead", [(3, 7), (70,)] + ([(4, 2048)] if ON_GPU else []), ids=str)
def test_rms_norm_linear_matches_float64(lead, outs, silu, dtype):
    """The norm and its projections with the normed input recomputed in the backward: every output and
    the gradients of x, the norm's weight and each projection's weight (one of the three projections
    left out of the loss, as a layer's unused output would be)."""
    N = 48 if not ON_GPU or lead != (4, 2048) else 2048
    x, w = _leaves((*lead, N), (N,), seed=N + len(outs))
    w = 1 + 0.5 * w
    Ws = [W / N ** 0.5 for W in _leaves(*[(o, N) for o in outs], seed=sum(outs))]
    dys = _leaves(*[(*lead, o) for o in outs], seed=7)
    used = [i != 1 for i in range(len(outs))]
    eps = 1e-6

    def run(fn, dtype):
        leaves = [t.detach().to(DEVICE, dtype).clone().requires_grad_() for t in (x, w, *Ws)]
        ys = fn(leaves[0], leaves[1], leaves[2:])
        sum((y * dy.to(DEVICE, dtype)).sum() for y, dy, u in zip(ys, dys, used) if u).backward()
        return list(ys) + [t.grad for t in leaves]

    def plain(x, w, Ws):
        y = fused.rms_norm_plain(x, w, eps, silu)
        return [F.linear(y, W) for W in Ws]

    ref = run(plain, torch.float64)
    got = run(lambda x, w, Ws: fused.rms_norm_linear_fused(x, w, eps, Ws, silu), dtype)
    base = run(plain, dtype)
    names = [f"y{i}" for i in range(len(outs))] + ["dx", "dw"] + [f"dW{i}" for i in range(len(outs))]
    for name, g, p, r in zip(names, got, base, ref):
        if r is None:    # the unused projection's weight: no gradient, fused or not
            assert g is None and p is None, name
            continue
        assert g.dtype == dtype and g.shape == r.shape, name
        err = rel_err(g, r)
        assert err <= max(BOUND[dtype], 1.5 * rel_err(p, r)), (name, err, rel_err(p, r))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalizer", [8.0, 1.0])
@pytest.mark.parametrize("shape", [(3, 7, 2, 16), (2049,)] + ([(4, 2048, 4, 64)] if ON_GPU else []), ids=str)
def test_gates_match_float64(shape, normalizer, dtype):
    """s = 1 - exp(g), g = logsigmoid(f) / normalizer: both outputs and df, with f spread over
    [-40, 40] (saturated sigmoids on both sides)."""
    f, ds, dg = _leaves(shape, shape, shape, seed=len(shape) + int(normalizer))
    f = 10 * f
    outs = {}
    for name, fn, dt in [("ref", fused.gates_plain, torch.float64), ("got", fused.gates_fused, dtype),
                         ("plain", fused.gates_plain, dtype)]:
        leaf = f.to(DEVICE, dt).clone().requires_grad_()
        s, g = fn(leaf, normalizer, dt)
        ((s * ds.to(DEVICE, dt)).sum() + (g * dg.to(DEVICE, dt)).sum()).backward()
        outs[name] = (s, g, leaf.grad)
    assert outs["got"][0].dtype == dtype and outs["got"][1].dtype == dtype and outs["got"][0].shape == shape
    assert (outs["got"][1] <= 0).all()
    for name, g, p, r in zip(["s", "g", "df"], outs["got"], outs["plain"], outs["ref"]):
        err = rel_err(g, r)
        assert err <= max(BOUND[dtype], 1.5 * rel_err(p, r)), (name, err, rel_err(p, r))


def test_layers_take_the_fused_path_on_cuda_in_eager_only(monkeypatch):
    """RMSNorm and SwiGLU call the kernels on CUDA tensors outside torch.compile, the plain forms
    elsewhere."""
    from gsa_kernels.layers.block import SwiGLU
    from gsa_kernels.layers.norms import RMSNorm
    calls = []
    monkeypatch.setattr(fused, "rms_norm_fused", lambda *a: calls.append("norm") or fused.rms_norm_plain(*a))
    monkeypatch.setattr(fused, "rms_norm_linear_fused", lambda x, w, eps, Ws, silu: calls.append("norm_linear")
                        or [F.linear(fused.rms_norm_plain(x, w, eps, silu), W) for W in Ws])
    monkeypatch.setattr(fused, "silu_mul_linear_fused",
                        lambda a, b, w: calls.append("silu_mul_linear") or F.linear(F.silu(a) * b, w))
    x = torch.randn(2, 3, 16, device=DEVICE)
    norm = RMSNorm(16).to(DEVICE)
    norm(x)
    SwiGLU(16, intermediate_size=8).to(DEVICE)(x, input_norm=norm)
    assert calls == (["norm", "norm_linear", "silu_mul_linear"] if x.is_cuda else [])


@pytest.mark.parametrize("output_gate", [False, True], ids=["o_proj", "output-gate"])
def test_model_step_with_fused_forms_equals_plain(monkeypatch, output_gate):
    """GSAModel's loss and every parameter's gradient with all fused forms taken (forced here: on a CPU
    the layers take the plain forms) equal those of the plain forms, float32: the layers wire the
    norms, projections, gates and SwiGLU to the fused functions correctly (the functions themselves
    are checked against float64 above)."""
    from gsa_kernels.layers.model import GSAModel

    def step(fused_forms):
        monkeypatch.setattr(fused, "_fused_here", lambda x: fused_forms)
        torch.manual_seed(3)
        model = GSAModel(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, num_slots=8,
                         use_output_gate=output_gate).to(DEVICE).train()
        ids = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(4)).to(DEVICE)
        loss, _ = model(ids, labels=ids)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_plain, grads_plain = step(False)
    loss_fused, grads_fused = step(True)
    assert rel_err(loss_fused, loss_plain) <= 1e-6
    assert grads_fused.keys() == grads_plain.keys()
    for name in grads_plain:
        assert grads_fused[name] is not None, name
        assert rel_err(grads_fused[name], grads_plain[name]) <= 1e-5, name
