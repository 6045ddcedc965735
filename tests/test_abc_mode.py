"""FLA 0.6.0 drop-in features: ABC mode (g=None), float32 gates with half-precision q, k, v, and the
keywords cu_seqlens_cpu and chunk_size (any power of two).

Both ops are checked against the float64 naive recurrence, whose ABC mode is written from the
definition (a running log-normaliser per slot, step by step) and does not call the library's helper
(gsa_kernels/abc_gates.py): forward, final states and every gradient, ds carrying both of its
contributions (the write weights and the gates).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, ON_GPU
from gsa_kernels import chunk_gsa, fused_recurrent_gsa
from gsa_kernels.abc_gates import abc_gates
from reference import naive_recurrent_gsa
from test_chunk import BOUNDS, DTYPES, HALF, assert_close

OPS = {"chunk": chunk_gsa, "recurrent": fused_recurrent_gsa}
# chunk_gsa's bfloat16 dots are wrong in Triton's interpreter (checks.check_interpreter)
OP_DTYPES = [(name, dt) for name in OPS for dt in DTYPES + ([] if ON_GPU or name == "chunk" else [torch.bfloat16])]


def _inputs(T, H=2, K=16, V=8, M=16, dtype=torch.float32, seed=0, gates="abc", N=1, gate_dtype=None):
    """q, k, v [1 or N, T, ...] in dtype; s (slot logits for ABC, else the model's 1 - exp(g)) and g
    (None for ABC) in gate_dtype (default dtype); initial states [N, ...] float32."""
    gen = torch.Generator().manual_seed(seed)
    B = 1
    q, k = (torch.randn(B, T, H, K, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen).to(dtype)
    gd = gate_dtype or dtype
    if gates == "abc":
        s, g = (2 * torch.randn(B, T, H, M, generator=gen)).to(gd), None
    else:
        g = F.logsigmoid(torch.randn(B, T, H, M, generator=gen, dtype=torch.float64)) / 8
        s, g = (1 - g.exp()).to(gd), g.to(gd)
    hk0, hv0 = torch.randn(N, H, K, M, generator=gen), torch.randn(N, H, M, V, generator=gen)
    return q, k, v, s, g, hk0, hv0


def run_op_and_naive(op, q, k, v, s, g, hk0, hv0, cu_seqlens=None, seed=1, both_kw=None, **kw):
    """Forward + backward of op on DEVICE and of the float64 naive recurrence on the same rounded
    inputs, with the same upstream gradients; g None is ABC mode in both, hk0 None: no initial state.
    kw go to op alone, both_kw to both. Returns (ours, ref) dicts of o, hk, hv and the gradients of
    every input given."""
    both_kw = both_kw or {}
    names = ["q", "k", "v", "s"] + ([] if g is None else ["g"]) + ([] if hk0 is None else ["hk0", "hv0"])
    ins = [q, k, v, s] + ([] if g is None else [g]) + ([] if hk0 is None else [hk0, hv0])
    ours_in = {n: x.detach().clone().to(DEVICE).requires_grad_() for n, x in zip(names, ins)}
    ref_in = {n: x.detach().double().requires_grad_() for n, x in zip(names, ins)}

    def call(f, t, cu, **extra):
        h0 = (t["hk0"], t["hv0"]) if "hk0" in t else None
        return f(t["q"], t["k"], t["v"], t["s"], t.get("g"), initial_state=h0, output_final_state=True,
                 cu_seqlens=cu, **extra)

    o, (hk, hv) = call(op, ours_in, None if cu_seqlens is None else cu_seqlens.to(DEVICE), **kw, **both_kw)
    ro, (rhk, rhv) = call(naive_recurrent_gsa, ref_in, cu_seqlens, **both_kw)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(ro.shape, generator=gen, dtype=torch.float64).to(o.dtype).double()
    dhk = torch.randn(rhk.shape, generator=gen, dtype=torch.float64).float().double()
    dhv = torch.randn(rhv.shape, generator=gen, dtype=torch.float64).float().double()
    (ro * do).sum().add((rhk * dhk).sum()).add((rhv * dhv).sum()).backward()
    torch.autograd.backward([o, hk, hv], [x.to(device=DEVICE, dtype=y.dtype) for x, y in
                                          ((do, o), (dhk, hk), (dhv, hv))])
    ours = {"o": o, "hk": hk, "hv": hv, **{"d" + n: x.grad for n, x in ours_in.items()}}
    ref = {"o": ro, "hk": rhk, "hv": rhv, **{"d" + n: x.grad for n, x in ref_in.items()}}
    return ours, ref, ours_in


# ---------------------------------------------------------------------------------------------------
# ABC mode (g=None)

@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("op_name,dtype", OP_DTYPES, ids=str)
def test_abc_matches_naive(op_name, dtype, initial_state):
    q, k, v, s, _, hk0, hv0 = _inputs(T=37, dtype=dtype, seed=3)
    if not initial_state:
        hk0 = hv0 = None
    kw = {"chunk_size": 16} if op_name == "chunk" else {}
    ours, ref, _ = run_op_and_naive(OPS[op_name], q, k, v, s, None, hk0, hv0, **kw)
    assert set(ours) >= {"ds", "dq"}
    assert_close(ours, ref, dtype, f"abc {op_name} {dtype} h0={initial_state}")


@pytest.mark.parametrize("op_name,dtype", OP_DTYPES, ids=str)
def test_abc_varlen_matches_naive(op_name, dtype):
    """Each packed sequence restarts its normaliser (g = 0 at its first token); an empty one keeps
    its initial state."""
    lengths = [1, 17, 0, 5]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v, s, _, hk0, hv0 = _inputs(T=sum(lengths), dtype=dtype, seed=5, N=len(lengths))
    kw = {"chunk_size": 16} if op_name == "chunk" else {}
    ours, ref, _ = run_op_and_naive(OPS[op_name], q, k, v, s, None, hk0, hv0, cu_seqlens=cu, **kw)
    assert_close(ours, ref, dtype, f"abc varlen {op_name} {dtype}")


def test_abc_with_cu_seqlens_cpu_equals_without():
    lengths = [6, 11]
    cu = torch.tensor([0, 6, 17], dtype=torch.int32)
    q, k, v, s, _, hk0, hv0 = _inputs(T=17, seed=9, N=2)
    q, k, v, s, hk0, hv0 = (x.to(DEVICE) for x in (q, k, v, s, hk0, hv0))
    for op in OPS.values():
        a, (ak, av) = op(q, k, v, s, initial_state=(hk0, hv0), output_final_state=True, cu_seqlens=cu.to(DEVICE))
        b, (bk, bv) = op(q, k, v, s, initial_state=(hk0, hv0), output_final_state=True, cu_seqlens=cu.to(DEVICE),
                         cu_seqlens_cpu=cu.long())
        assert all(torch.equal(x, y) for x, y in ((a, b), (ak, bk), (av, bv))), lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_abc_gates_range(dtype):
    """g <= 0 (0 exactly at each sequence's first token), weights in (0, 1] (1 at the first token; 0
    only by underflow),
    for logits of every scale; weights in s's dtype, gates in float32 (float64 for float64 s)."""
    gen = torch.Generator().manual_seed(0)
    s = (torch.randn(1, 40, 2, 7, generator=gen, dtype=torch.float64) * 20).to(dtype)
    cu = torch.tensor([0, 1, 13, 13, 40])
    w, g = abc_gates(s, cu)
    assert w.dtype == dtype and g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(g).all() and (g <= 0).all()
    assert (w >= 0).all() and (w <= 1).all()
    # > 0 where exp(s_t - z_t) is representable (logits 20 apart underflow float16 and float32)
    assert (abc_gates(s / 8, cu)[0] > 0).all() if dtype != torch.float16 else (abc_gates(s / 20, cu)[0] > 0).all()
    for first in (0, 1, 13):
        assert (g[:, first] == 0).all() and (w[:, first] == 1).all()
    w1, g1 = abc_gates(s[:, 13:])   # one sequence from its own start: the same as packed
    assert torch.equal(w1, w[:, 13:]) and torch.equal(g1, g[:, 13:])


def test_abc_gates_are_the_running_normaliser():
    """The helper against the definition: z = log sum exp of s so far; g = z_{t-1} - z_t, weight
    exp(s_t - z_t); and gradients of both reach s (compared with autograd through the definition)."""
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(2, 9, 1, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w, g = abc_gates(s)
    z = torch.stack([torch.logsumexp(s[:, :t + 1], 1) for t in range(9)], 1)
    w_ref = (s - z).exp()
    g_ref = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1] - z[:, 1:]], 1)
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(g, g_ref)
    c = torch.randn(2, 2, 9, 1, 3, generator=gen, dtype=torch.float64)
    (ds,) = torch.autograd.grad((w * c[0]).sum() + (g * c[1]).sum(), s)
    (ds_ref,) = torch.autograd.grad((w_ref * c[0]).sum() + (g_ref * c[1]).sum(), s)
    torch.testing.assert_close(ds, ds_ref)


def test_abc_compiles_fullgraph():
    """g=None inside torch.compile(fullgraph=True): the helper is plain torch ops before the custom op."""
    import torch._dynamo
    backend = "inductor" if ON_GPU else "aot_eager"
    q, k, v, s, _, hk0, hv0 = (x if x is None else x.to(DEVICE) for x in _inputs(T=20, seed=2))
    torch._dynamo.reset()
    try:
        for op in OPS.values():
            def f(q, k, v, s, hk0, hv0, op=op):
                return op(q, k, v, s, initial_state=(hk0, hv0), output_final_state=True)
            eager = f(q, k, v, s, hk0, hv0)
            compiled = torch.compile(f, backend=backend, fullgraph=True)(q, k, v, s, hk0, hv0)
            torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(compiled[1][1], eager[1][1], rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# float32 gates with half-precision q, k, v

@pytest.mark.parametrize("abc", [False, True], ids=["gsa", "abc"])
@pytest.mark.parametrize("op_name,dtype", [(n, d) for n, d in OP_DTYPES if d in HALF], ids=str)
def test_float32_gates_with_half_inputs(op_name, dtype, abc):
    """s, g float32 with float16 / bfloat16 q, k, v: within the half bounds of the float64 reference
    on the same inputs; o and dq, dk, dv in q's dtype, ds and dg in float32 (their own dtypes)."""
    q, k, v, s, g, hk0, hv0 = _inputs(T=37, dtype=dtype, seed=4, gates="abc" if abc else "model",
                                      gate_dtype=torch.float32)
    kw = {"chunk_size": 16} if op_name == "chunk" else {}
    ours, ref, ins = run_op_and_naive(OPS[op_name], q, k, v, s, g, hk0, hv0, **kw)
    assert ours["o"].dtype == dtype
    assert ours["dq"].dtype == ours["dk"].dtype == ours["dv"].dtype == dtype
    assert ours["ds"].dtype == torch.float32
    if not abc:
        assert ours["dg"].dtype == torch.float32
    assert_close(ours, ref, dtype, f"fp32 gates {op_name} {dtype} abc={abc}")


@pytest.mark.parametrize("op_name", list(OPS))
def test_float32_gates_without_grad(op_name):
    """The inference paths (chunk_gsa's forward-only float16 states, the decode step) read float32 gates."""
    for T in (1, 20):
        q, k, v, s, g, hk0, hv0 = _inputs(T=T, dtype=torch.float16, seed=T, gates="model",
                                          gate_dtype=torch.float32)
        ref, (rhk, _) = naive_recurrent_gsa(*(x.double() for x in (q, k, v, s, g)),
                                            initial_state=(hk0.double(), hv0.double()), output_final_state=True)
        with torch.no_grad():
            o, (hk, _) = OPS[op_name](*(x.to(DEVICE) for x in (q, k, v, s, g)),
                                      initial_state=(hk0.to(DEVICE), hv0.to(DEVICE)), output_final_state=True)
        err = ((o.double().cpu() - ref).norm() / ref.norm()).item()
        assert err <= BOUNDS[torch.float16][0], (T, err)
        assert ((hk.double().cpu() - rhk).norm() / rhk.norm()).item() <= BOUNDS[torch.float16][1]


@pytest.mark.parametrize("op_name", list(OPS))
def test_other_mixed_dtypes_raise(op_name):
    op = OPS[op_name]
    q, k, v, s, g, _, _ = (x.to(DEVICE) for x in _inputs(T=4, dtype=torch.float16, gates="model"))
    cases = [  # (argument name, call arguments)
        ("s", (q.float(), k.float(), v.float(), s, g.float())),          # half s with float32 q
        ("g", (q.float(), k.float(), v.float(), s.float(), g)),          # half g with float32 q
        ("g", (q, k, v, s, g.bfloat16())),                               # bfloat16 g with float16 q
        ("s", (q, k, v, s.double(), g)),                                 # float64 s
        ("k", (q, k.float(), v, s, g)),                                  # float32 k with float16 q
        ("v", (q, k, v.float(), s.float(), g.float())),                  # float32 v with float16 q
        ("s", (q.float(), k.float(), v.float(), s, None)),               # ABC: half s with float32 q
    ]
    for name, args in cases:
        with pytest.raises(TypeError, match=rf"^{name} \("):
            op(*args)


# ---------------------------------------------------------------------------------------------------
# FLA keywords: cu_seqlens_cpu, chunk_size

@pytest.mark.parametrize("op_name", list(OPS))
def test_cu_seqlens_cpu(op_name):
    op = OPS[op_name]
    q, k, v, s, g, _, _ = (x.to(DEVICE) for x in _inputs(T=17, gates="model"))
    cu = torch.tensor([0, 6, 17], dtype=torch.int32)
    a, _ = op(q, k, v, s, g, cu_seqlens=cu.to(DEVICE))
    b, _ = op(q, k, v, s, g, cu_seqlens=cu.to(DEVICE), cu_seqlens_cpu=cu.long())
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cu_seqlens_cpu.*shape"):
        op(q, k, v, s, g, cu_seqlens=cu.to(DEVICE), cu_seqlens_cpu=torch.tensor([0, 17]))
    with pytest.raises(ValueError, match="end at T"):      # the host copy is what the checks read
        op(q, k, v, s, g, cu_seqlens=cu.to(DEVICE), cu_seqlens_cpu=torch.tensor([0, 6, 16]))
    with pytest.raises(ValueError, match="without cu_seqlens"):
        op(q, k, v, s, g, cu_seqlens_cpu=cu)
    with pytest.raises(TypeError, match="cu_seqlens_cpu"):
        op(q, k, v, s, g, cu_seqlens=cu.to(DEVICE), cu_seqlens_cpu=cu.tolist())


def test_chunk_size_powers_of_two():
    """Any power of two, as FLA accepts: below 16 runs as 16, above 64 as 64 (bit for bit those)."""
    q, k, v, s, g, _, _ = (x.to(DEVICE) for x in _inputs(T=40, gates="model"))
    run = lambda c: chunk_gsa(q, k, v, s, g, output_final_state=True, chunk_size=c)   # noqa: E731
    o16, o64 = run(16), run(64)
    for c, want in ((1, o16), (8, o16), (128, o64), (1024, o64)):
        got = run(c)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1][0], want[1][0]), c
    assert ((run(32)[0] - o64[0]).norm() / o64[0].norm()).item() <= BOUNDS[torch.float32][0]
    for bad in (0, -16, 48, 24.0, True, "64"):
        with pytest.raises(ValueError, match="chunk_size"):
            run(bad)
