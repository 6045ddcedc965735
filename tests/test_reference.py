"""The three reference forms of GSA agree with each other, in float64 on the CPU.

naive_recurrent_gsa is the definition; quadratic_gsa and chunk_gsa_torch must match it on o, the
final states and every gradient (q, k, v, s, g, hk0, hv0) to 1e-10 relative L2 error, for drawn
shapes, chunk sizes, scales, gates and initial states. The naive form loops over time in Python, so
the strategies keep B*T of its cases small; the quadratic form's [T, T, M] tensors bound B*H*T^2*M.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st

from reference import chunk_gsa_torch, naive_recurrent_gsa, quadratic_gsa

TOL = 1e-10
NAIVE_STEPS = 320             # max B*T for cases the naive form runs
QUADRATIC_BUDGET = 4_000_000  # max B*H*T*T*M elements of one quadratic-form decay tensor
GATES = ("model", "zero", "mild", "deep", "mixed")
H0 = ("none", "both", "hk", "hv")
FORMS = {"naive": naive_recurrent_gsa, "quadratic": quadratic_gsa, "chunked": chunk_gsa_torch}


def examples(factor: float) -> settings:
    """This test's share of the active profile's example budget (HYPOTHESIS_PROFILE)."""
    return settings(max_examples=max(2, round(settings.default.max_examples * factor)))


@dataclass(frozen=True)
class Case:
    B: int
    T: int
    H: int
    K: int
    V: int
    M: int
    chunk_size: int = 64
    scale: float | None = None
    gates: str = "model"
    h0: str = "both"
    seed: int = 0

    def __repr__(self):
        scale = "default" if self.scale is None else f"{self.scale:.3g}"
        return (f"B{self.B}-T{self.T}-H{self.H}-K{self.K}-V{self.V}-M{self.M}-C{self.chunk_size}"
                f"-scale={scale}-gates={self.gates}-h0={self.h0}-seed{self.seed}")


def make_inputs(case: Case, dtype=torch.float64, N: int | None = None) -> dict:
    """Fresh random leaves q, k, v, s, g, hk0, hv0 (None where the case has no such state), and the
    random upstream gradients do, dhk, dhv, all from the case's seed. N sequences (default B)."""
    gen = torch.Generator().manual_seed(case.seed)
    B, T, H, K, V, M = case.B, case.T, case.H, case.K, case.V, case.M

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    gate_shape = (B, T, H, M)
    s = rand(*gate_shape)
    if case.gates == "model":          # the layer's own gates: damped logsigmoid, s = 1 - alpha
        g = F.logsigmoid(randn(*gate_shape)) / 8
        s = 1 - g.exp()
    elif case.gates == "zero":         # no forgetting at all
        g = torch.zeros(gate_shape, dtype=torch.float64)
    elif case.gates == "mild":
        g = -rand(*gate_shape)
    elif case.gates == "deep":         # down to near-total forgetting every step
        g = -30 * rand(*gate_shape)
    elif case.gates == "mixed":        # each entry exactly 0, -30, or in between
        pick = torch.randint(0, 3, gate_shape, generator=gen)
        g = torch.where(pick == 0, 0.0, torch.where(pick == 1, -30.0, -5 * rand(*gate_shape)))
    else:
        raise ValueError(f"unknown gates {case.gates!r}")
    N = B if N is None else N
    leaves = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V), s=s, g=g,
                  hk0=randn(N, H, K, M) if case.h0 in ("both", "hk") else None,
                  hv0=randn(N, H, M, V) if case.h0 in ("both", "hv") else None)
    leaves = {name: None if x is None else x.to(dtype).requires_grad_() for name, x in leaves.items()}
    upstream = dict(do=randn(B, T, H, V), dhk=randn(N, H, K, M), dhv=randn(N, H, M, V))
    return dict(leaves=leaves, upstream={name: x.to(dtype) for name, x in upstream.items()})


def run(form: str, case: Case, inputs: dict, cu_seqlens=None) -> dict:
    """o, the final states and the gradient of every leaf under the random upstream gradients."""
    x = inputs["leaves"]
    initial_state = None if case.h0 == "none" else (x["hk0"], x["hv0"])
    kwargs = dict(chunk_size=case.chunk_size) if form == "chunked" else {}
    o, (hk, hv) = FORMS[form](x["q"], x["k"], x["v"], x["s"], x["g"], scale=case.scale,
                              initial_state=initial_state, output_final_state=True,
                              cu_seqlens=cu_seqlens, **kwargs)
    up = inputs["upstream"]
    loss = (o * up["do"]).sum() + (hk * up["dhk"]).sum() + (hv * up["dhv"]).sum()
    names = [name for name, leaf in x.items() if leaf is not None]
    grads = torch.autograd.grad(loss, [x[name] for name in names])
    out = dict(o=o.detach(), hk=hk.detach(), hv=hv.detach())
    out.update({f"d{name}": grad for name, grad in zip(names, grads)})
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; the absolute error where the reference is exactly zero."""
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    diff, ref = (a - b).norm().item(), b.norm().item()
    return diff / ref if ref > 0 else diff


def assert_close(got: dict, ref: dict, label: str, tol: float = TOL):
    assert got.keys() == ref.keys()
    errors = {name: rel_err(got[name], ref[name]) for name in ref}
    for name, value in got.items():
        assert torch.isfinite(value).all(), f"{label}: {name} has inf/NaN"
    bad = {name: f"{err:.2e}" for name, err in errors.items() if not err <= tol}
    assert not bad, f"{label}: relative L2 error above {tol:g} in {bad}"


# ---------------------------------------------------------------- strategies

DIMS = st.sampled_from([1, 2, 3, 5, 8, 16, 48, 60, 64])
SLOTS = (1, 2, 5, 16, 48, 60, 64)


def lengths(max_t: int):
    """T: a third within one chunk, a third over several, a third at the chunk sizes and +-1 of them."""
    edges = [t for t in (1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 192, 300, 320, 600) if t <= max_t]
    return st.one_of(st.integers(1, 64), st.integers(65, max_t), st.sampled_from(edges))


# None (the default K**-0.5), 1.0 (the paper's layer), or a multiple of K**-0.5
SCALES = st.one_of(st.none(), st.just(1.0), st.floats(0.1, 2.0).map(lambda f: ("factor", f)))


@st.composite
def cases(draw, max_steps=NAIVE_STEPS, max_t=300):
    T = draw(lengths(max_t))
    B = draw(st.integers(1, max(1, min(3, max_steps // T))))
    H = draw(st.integers(1, 2))
    K, V = draw(DIMS), draw(DIMS)
    M = draw(st.sampled_from([m for m in SLOTS if B * H * T * T * m <= QUADRATIC_BUDGET] or [1]))
    scale = draw(SCALES)
    if isinstance(scale, tuple):
        scale = scale[1] * K ** -0.5
    return Case(B=B, T=T, H=H, K=K, V=V, M=M, chunk_size=draw(st.sampled_from([16, 32, 64])),
                scale=scale,
                gates=draw(st.sampled_from(GATES)), h0=draw(st.sampled_from(H0)),
                seed=draw(st.integers(0, 2**31 - 1)))


def note_shape(case: Case):
    """Hypothesis events (shown by --hypothesis-show-statistics): how T sits against the chunk."""
    C = case.chunk_size
    event("T < chunk" if case.T < C else "T = n * chunk" if case.T % C == 0 else "T > chunk, not a multiple")
    event(f"T in {(case.T - 1) // 100 * 100 + 1}..{(case.T - 1) // 100 * 100 + 100}")


# ---------------------------------------------------------------- the forms agree

@examples(1.0)
@given(case=cases())
def test_forms_agree_with_naive(case):
    note_shape(case)
    inputs = make_inputs(case)
    ref = run("naive", case, inputs)
    for form in ("quadratic", "chunked"):
        assert_close(run(form, case, inputs), ref, f"{form} vs naive, {case}")


@examples(1.0)
@given(case=cases(max_steps=10**9, max_t=600))
def test_chunked_agrees_with_quadratic_on_longer_sequences(case):
    # past the naive form's budget: T up to 600, several batches
    note_shape(case)
    inputs = make_inputs(case)
    assert_close(run("chunked", case, inputs), run("quadratic", case, inputs), f"chunked vs quadratic, {case}")


@pytest.mark.parametrize("form", FORMS)
@examples(1.0)
@given(data=st.data())
def test_varlen_equals_each_sequence_alone(form, data):
    lengths = data.draw(st.lists(st.one_of(st.just(1), st.integers(0, 40)), min_size=1, max_size=5)
                        .filter(lambda ls: sum(ls) >= 1), label="lengths")
    N, T = len(lengths), sum(lengths)
    case = Case(B=1, T=T, H=data.draw(st.integers(1, 2)), K=data.draw(DIMS), V=data.draw(DIMS),
                M=data.draw(st.sampled_from(SLOTS)), chunk_size=data.draw(st.sampled_from([16, 32, 64])),
                scale=data.draw(st.one_of(st.none(), st.floats(0.05, 0.5))),
                gates=data.draw(st.sampled_from(GATES)), h0=data.draw(st.sampled_from(H0)),
                seed=data.draw(st.integers(0, 2**31 - 1)))
    inputs = make_inputs(case, N=N)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    got = run(form, case, inputs, cu_seqlens=cu)

    # each sequence alone, through the same leaves, so the gradients add up in the same tensors
    x, up = inputs["leaves"], inputs["upstream"]
    kwargs = dict(chunk_size=case.chunk_size) if form == "chunked" else {}
    outs, hks, hvs = [], [], []
    for n in range(N):
        start, end = int(cu[n]), int(cu[n + 1])
        initial_state = None if case.h0 == "none" else tuple(
            None if h is None else h[n:n + 1] for h in (x["hk0"], x["hv0"]))
        o, (hk, hv) = FORMS[form](*(x[name][:, start:end] for name in ("q", "k", "v", "s", "g")),
                                  scale=case.scale, initial_state=initial_state,
                                  output_final_state=True, **kwargs)
        outs.append(o)
        hks.append(hk)
        hvs.append(hv)
    o, hk, hv = torch.cat(outs, 1), torch.cat(hks, 0), torch.cat(hvs, 0)
    loss = (o * up["do"]).sum() + (hk * up["dhk"]).sum() + (hv * up["dhv"]).sum()
    names = [name for name in got if name.startswith("d")]
    grads = torch.autograd.grad(loss, [x[name[1:]] for name in names])
    ref = dict(o=o.detach(), hk=hk.detach(), hv=hv.detach(), **dict(zip(names, grads)))
    assert_close(got, ref, f"{form} varlen {lengths} vs each alone, {case}", tol=1e-12)


# ---------------------------------------------------------------- autograd itself

@pytest.mark.parametrize("form", FORMS)
@examples(0.5)
@given(case=st.builds(Case, B=st.integers(1, 2), T=st.integers(1, 5), H=st.just(1),
                      K=st.integers(1, 3), V=st.integers(1, 3), M=st.integers(1, 3),
                      chunk_size=st.sampled_from([2, 4]), scale=st.floats(0.3, 1.5),
                      gates=st.sampled_from(GATES), h0=st.just("both"), seed=st.integers(0, 2**31 - 1)))
def test_gradcheck(form, case):
    # finite differences against autograd: catches a wrong backward that all three forms might share
    x = make_inputs(case)["leaves"]
    kwargs = dict(chunk_size=case.chunk_size) if form == "chunked" else {}

    def fn(q, k, v, s, g, hk0, hv0):
        o, (hk, hv) = FORMS[form](q, k, v, s, g, scale=case.scale, initial_state=(hk0, hv0),
                                  output_final_state=True, **kwargs)
        return o, hk, hv

    assert torch.autograd.gradcheck(fn, tuple(x.values()), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("gates", ["model", "mixed"])
def test_gradcheck_chunked_across_sub_chunks(gates):
    # C = 32 holds two 16-row sub-chunks: the factored off-diagonal blocks get finite differences too
    case = Case(B=1, T=37, H=1, K=2, V=2, M=2, chunk_size=32, scale=0.7, gates=gates, seed=7)
    x = make_inputs(case)["leaves"]

    def fn(q, k, v, s, g, hk0, hv0):
        o, (hk, hv) = chunk_gsa_torch(q, k, v, s, g, scale=case.scale, initial_state=(hk0, hv0),
                                      output_final_state=True, chunk_size=case.chunk_size)
        return o, hk, hv

    assert torch.autograd.gradcheck(fn, tuple(x.values()), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- extreme gates, dtypes, API

@pytest.mark.parametrize("gates, dtype", [
    ("deep", torch.float32), ("mixed", torch.float32), ("floor", torch.float32),
    ("mixed", torch.float64), ("mixed", torch.bfloat16)], ids=lambda x: str(x).replace("torch.", ""))
def test_chunked_long_sequence_of_very_negative_gates_stays_finite(gates, dtype):
    # T = 65536 (docs/contract.md, "Numerical contract"): the cumulative gate reaches about -2e6 over the sequence
    case = Case(B=1, T=65536, H=1, K=8, V=8, M=16, chunk_size=64, gates="deep" if gates == "floor" else gates)
    inputs = make_inputs(case, dtype)
    if gates == "floor":  # every step at the bottom of the range
        inputs["leaves"]["g"] = torch.full_like(inputs["leaves"]["g"], -30.0).requires_grad_()
    out = run("chunked", case, inputs)
    for name, value in out.items():
        assert torch.isfinite(value).all(), f"{name} has inf/NaN"


@pytest.mark.parametrize("gates", ["deep", "mixed"])
def test_quadratic_very_negative_gates_stay_finite(gates):
    # exp(Gc_t - Gc_j) above the diagonal would be e^(+15000): it must be masked before exp
    case = Case(B=1, T=512, H=1, K=4, V=4, M=8, gates=gates)
    out = run("quadratic", case, make_inputs(case, torch.float32))
    for name, value in out.items():
        assert torch.isfinite(value).all(), f"{name} has inf/NaN"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs_compute_in_float32(form, dtype):
    case = Case(B=2, T=40, H=2, K=16, V=16, M=16, chunk_size=16, gates="model")
    x = make_inputs(case, dtype)["leaves"]
    o, (hk, hv) = FORMS[form](x["q"], x["k"], x["v"], x["s"], x["g"], initial_state=(x["hk0"], x["hv0"]),
                              output_final_state=True)
    assert (o.dtype, hk.dtype, hv.dtype) == (dtype, torch.float32, torch.float32)
    ref_o, (ref_hk, ref_hv) = naive_recurrent_gsa(
        *(x[name].double() for name in ("q", "k", "v", "s", "g")),
        initial_state=(x["hk0"].double(), x["hv0"].double()), output_final_state=True)
    # the rounding of o to the input dtype dominates; the states stay float32
    o_tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}[dtype]
    assert rel_err(o.double(), ref_o) <= o_tol
    assert rel_err(hk.double(), ref_hk) <= 1e-5 and rel_err(hv.double(), ref_hv) <= 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_defaults_scale_and_final_state(form):
    case = Case(B=1, T=20, H=1, K=9, V=4, M=5, chunk_size=16, h0="none")
    x = make_inputs(case)["leaves"]
    args = [x[name] for name in ("q", "k", "v", "s", "g")]
    o, states = FORMS[form](*args)
    assert states == (None, None)
    o_explicit, _ = FORMS[form](*args, scale=9 ** -0.5)
    assert torch.equal(o, o_explicit)
    # non-contiguous inputs: the same numbers through a transposed storage
    strided = [a.detach().repeat_interleave(2, -1)[..., ::2] for a in args]
    assert not strided[0].is_contiguous()
    assert rel_err(FORMS[form](*strided)[0], o.detach()) <= 1e-14


@pytest.mark.parametrize("form", FORMS)
def test_empty_sequences_in_varlen_keep_their_initial_state(form):
    case = Case(B=1, T=6, H=1, K=3, V=2, M=4)
    x = make_inputs(case)["leaves"]
    hk0, hv0 = torch.randn(3, 1, 3, 4, dtype=torch.float64), torch.randn(3, 1, 4, 2, dtype=torch.float64)
    cu = torch.tensor([0, 0, 6, 6])
    o, (hk, hv) = FORMS[form](*(x[name] for name in ("q", "k", "v", "s", "g")), initial_state=(hk0, hv0),
                              output_final_state=True, cu_seqlens=cu)
    assert o.shape == (1, 6, 1, 2)
    for n in (0, 2):
        assert torch.equal(hk[n], hk0[n]) and torch.equal(hv[n], hv0[n])


@pytest.mark.parametrize("form", ["quadratic", "chunked"])
def test_bad_inputs_raise_clear_errors(form):
    x = make_inputs(Case(B=2, T=8, H=1, K=3, V=2, M=4))["leaves"]
    q, k, v, s, g = (x[name].detach() for name in ("q", "k", "v", "s", "g"))
    fn = FORMS[form]
    with pytest.raises(ValueError, match="cu_seqlens needs batch size 1"):
        fn(q, k, v, s, g, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"^v must have shape \(2, 8, 1, 2\)|^v must"):
        fn(q, k, v[:, :4], s, g)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        fn(q[:1], k[:1], v[:1], s[:1], g[:1], cu_seqlens=torch.tensor([0, 5, 7]))
    with pytest.raises(ValueError, match="hk0 must have shape"):
        fn(q, k, v, s, g, initial_state=(torch.zeros(1, 1, 3, 4), None))
    with pytest.raises(TypeError, match="g must be a floating-point tensor"):
        fn(q, k, v, s, g.long())
    if form == "chunked":
        with pytest.raises(ValueError, match="chunk_size"):
            fn(q, k, v, s, g, chunk_size=24)


def test_case_ids_are_readable():
    assert repr(Case(B=2, T=1024, H=4, K=60, V=64, M=64)) == \
        "B2-T1024-H4-K60-V64-M64-C64-scale=default-gates=model-h0=both-seed0"
