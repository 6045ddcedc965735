"""chunk_gsa (Triton) against the float64 naive recurrence: forward, final states and every gradient.

Runs on CUDA when present, in Triton's interpreter on CPU tensors otherwise (tests/conftest.py). The
interpreter is slow, so its shapes are small; the GPU runs the same properties at larger sizes and in
bfloat16 (the interpreter's bf16 tl.dot is wrong in Triton 3.6).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICE, ON_GPU
from gsa_kernels import chunk_gsa, last_launches
from gsa_kernels.launches import override
from reference import chunk_gsa_torch, naive_recurrent_gsa

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
HALF = [torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# docs/contract.md, "Numerical contract": relative L2 error bounds (o, and states + gradients)
BOUNDS = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 1e-2), torch.bfloat16: (5e-3, 1e-2)}
GRAD_NAMES = ("dq", "dk", "dv", "ds", "dg", "dhk0", "dhv0")


def make_gates(shape, kind, dtype, gen):
    if kind == "model":          # the layer's own: g = logsigmoid(x) / 8, s = 1 - exp(g)
        g = F.logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64)) / 8
        s = 1 - g.exp()
    elif kind == "zero":         # no forgetting at all
        g = torch.zeros(shape, dtype=torch.float64)
        s = torch.rand(shape, generator=gen, dtype=torch.float64)
    elif kind == "steep":        # near-total forgetting, down to -30 a step, with exact zeros mixed in
        g = -30 * torch.rand(shape, generator=gen, dtype=torch.float64)
        g = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.2, 0.0, g)
        s = torch.rand(shape, generator=gen, dtype=torch.float64)
    else:                        # mixed magnitudes over the whole range
        g = -torch.rand(shape, generator=gen, dtype=torch.float64) ** 4 * 30
        s = torch.rand(shape, generator=gen, dtype=torch.float64)
    return s.to(dtype), g.to(dtype)


def make_inputs(B, T, H, K, V, M, dtype, gates="model", seed=0, initial_state=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen).to(dtype)
    k = torch.randn(B, T, H, K, generator=gen).to(dtype)
    v = torch.randn(B, T, H, V, generator=gen).to(dtype)
    s, g = make_gates((B, T, H, M), gates, dtype, gen)
    N = B
    hk0 = torch.randn(N, H, K, M, generator=gen) if initial_state else None
    hv0 = torch.randn(N, H, M, V, generator=gen) if initial_state else None
    return q, k, v, s, g, hk0, hv0


def rel_err(got, ref):
    """||got - ref|| / ||ref||; a reference that is exactly zero in the math (dg at T = 1 with no
    initial state, say) is compared absolutely: its float32 rounding residue (~1e-7) against a
    floor of 0.1 for the norm (float32 residue there reaches ~1e-7 for O(1) terms that cancel)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - ref).norm() / ref.norm().clamp_min(1e-1)).item()


def backward_both(ours_out, ref_out, ours_in, ref_in, gen):
    """Backward of our (o, hk, hv) and of the float64 reference's with the same random upstream
    gradients, rounded as the op receives them: do in o's dtype (a bf16 output gets a bf16 gradient),
    dhk / dhv in float32; the reference gets the same rounded values, as for the inputs.
    Returns (ours, ref) dicts of the outputs and the input gradients, and (do, dhk, dhv)."""
    (o, hk, hv), (ro, rhk, rhv) = ours_out, ref_out
    do = torch.randn(ro.shape, generator=gen, dtype=torch.float64).to(o.dtype).double()
    dhk = torch.randn(rhk.shape, generator=gen, dtype=torch.float64).float().double()
    dhv = torch.randn(rhv.shape, generator=gen, dtype=torch.float64).float().double()
    (ro * do).sum().add((rhk * dhk).sum()).add((rhv * dhv).sum()).backward()
    dev = lambda x, like: x.to(device=DEVICE, dtype=like.dtype)   # noqa: E731
    torch.autograd.backward([o, hk, hv], [dev(do, o), dev(dhk, hk), dev(dhv, hv)])
    ours = {"o": o, "hk": hk, "hv": hv}
    ref = {"o": ro, "hk": rhk, "hv": rhv}
    for name, a, b in zip(GRAD_NAMES, ours_in, ref_in):
        ours[name], ref[name] = a.grad, b.grad
    return ours, ref, (do, dhk, dhv)


def run_both(q, k, v, s, g, hk0, hv0, scale=None, cu_seqlens=None, chunk_size=None, seed=1,
             checkpoint_level=None):
    """Forward + backward of chunk_gsa on DEVICE and of the float64 naive recurrence on the same
    (already rounded) inputs, with the same random upstream gradients. Returns (ours, ref) dicts;
    for float32 inputs ref["fp32_baseline"] also gives the errors of the same computation done by
    PyTorch in float32 (reference.chunk_gsa_torch), the conditioning yardstick of assert_close,
    as a function: it is computed only when an error is over the contract's bound."""
    gen = torch.Generator().manual_seed(seed)
    has_h0 = hk0 is not None
    ins = [q, k, v, s, g] + ([hk0, hv0] if has_h0 else [])
    ours_in = [x.detach().clone().to(DEVICE).requires_grad_() for x in ins]
    ref_in = [x.detach().double().requires_grad_() for x in ins]
    kw = dict(scale=scale, output_final_state=True)
    cu_dev = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    if checkpoint_level is not None:
        extra["checkpoint_level"] = checkpoint_level
    o, (hk, hv) = chunk_gsa(*ours_in[:5], initial_state=tuple(ours_in[5:]) if has_h0 else None,
                            cu_seqlens=cu_dev, **kw, **extra)
    ro, (rhk, rhv) = naive_recurrent_gsa(*ref_in[:5], initial_state=tuple(ref_in[5:]) if has_h0 else None,
                                         cu_seqlens=cu_seqlens, **kw)
    ours, ref, (do, dhk, dhv) = backward_both((o, hk, hv), (ro, rhk, rhv), ours_in, ref_in, gen)
    if q.dtype == torch.float32:
        ref["fp32_baseline"] = fp32_baseline(chunk_gsa_torch, ins, ref, (do, dhk, dhv),
                                             dict(kw, cu_seqlens=cu_seqlens))
    return ours, ref


def fp32_baseline(torch_op, ins, ref, grads, kw):
    """A function giving the errors against ref of the same computation done by PyTorch in float32
    (torch_op on ins = [q, k, v, s, g] + optional [hk0, hv0], same upstream gradients): the
    conditioning yardstick of assert_close, computed only when an error is over the bound."""
    def errors():
        base_in = [x.detach().clone().requires_grad_() for x in ins]
        h0 = tuple(base_in[5:]) if len(base_in) > 5 else None
        bo, (bhk, bhv) = torch_op(*base_in[:5], initial_state=h0, **kw)
        torch.autograd.backward([bo, bhk, bhv], [x.float() for x in grads])
        base = {"o": bo, "hk": bhk, "hv": bhv}
        base.update({name: a.grad for name, a in zip(GRAD_NAMES, base_in)})
        return {name: rel_err(base[name], ref[name]) for name in base}
    return errors


def assert_close(ours, ref, dtype, context=""):
    """The bounds of docs/contract.md, "Numerical contract". float32: an input can be ill-conditioned
    for float32 arithmetic itself (scale 1, no forgetting: slot scores in the hundreds, a near one-hot
    softmax whose gradient cancels), and then no float32 implementation meets 1e-5; there the bound
    becomes twice the error of PyTorch's own float32 evaluation of the same algorithm on the same
    inputs (never looser than needed: it only exceeds 1e-5 when PyTorch's float32 error does)."""
    o_bound, bound = BOUNDS[dtype]
    names = [n for n in ref if n != "fp32_baseline"]
    errors = {name: rel_err(ours[name], ref[name]) for name in names}
    limit = {n: o_bound if n == "o" else bound for n in names}
    if "fp32_baseline" in ref and any(errors[n] > limit[n] for n in names):
        baseline = ref["fp32_baseline"]()
        limit = {n: max(limit[n], 2 * baseline.get(n, 0.0)) for n in names}
    bad = {n: e for n, e in errors.items() if e > limit[n]}
    assert not bad, f"{context}: over the bound: {bad}; all errors: {errors}; bounds: {limit}"
    return errors


# ---------------------------------------------------------------------------------------------------
# Hypothesis: drawn shapes, dtypes, gates, scale, initial states, chunk sizes

if ON_GPU:
    T_MAX, D_SIZES, M_SIZES, CHUNKS = 300, [16, 60, 64, 100, 128], [5, 16, 48, 64, 100], [None, 16, 32, 64]
else:
    T_MAX, D_SIZES, M_SIZES, CHUNKS = 40, [4, 16, 24], [5, 16, 20], [16]


@settings(max_examples=40 if ON_GPU else 10, report_multiple_bugs=False)
@given(B=st.integers(1, 2), T=st.integers(1, T_MAX), H=st.integers(1, 2),
       K=st.sampled_from(D_SIZES), V=st.sampled_from(D_SIZES), M=st.sampled_from(M_SIZES),
       dtype=st.sampled_from(DTYPES), gates=st.sampled_from(["model", "zero", "steep", "mixed"]),
       scale=st.sampled_from([None, 1.0, 0.3]), initial_state=st.booleans(),
       chunk_size=st.sampled_from(CHUNKS), seed=st.integers(0, 2**16))
def test_chunk_matches_naive(B, T, H, K, V, M, dtype, gates, scale, initial_state, chunk_size, seed):
    q, k, v, s, g, hk0, hv0 = make_inputs(B, T, H, K, V, M, dtype, gates, seed, initial_state)
    ours, ref = run_both(q, k, v, s, g, hk0, hv0, scale=scale, chunk_size=chunk_size, seed=seed + 1)
    assert_close(ours, ref, dtype, f"B{B}-T{T}-H{H}-K{K}-V{V}-M{M}-{dtype}-{gates}")


# ---------------------------------------------------------------------------------------------------
# Explicit edges

EDGES = [  # (B, T, H, K, V, M, gates, chunk_size)
    (1, 1, 1, 16, 16, 16, "model", 16),        # T = 1
    (2, 15, 1, 16, 8, 16, "model", 16),        # T = chunk - 1
    (1, 17, 2, 8, 16, 16, "model", 16),        # T = chunk + 1
    (1, 33, 1, 16, 16, 16, "zero", 16),        # g = 0: nothing forgotten
    (1, 40, 1, 16, 16, 16, "steep", 16),       # g down to -30
    (1, 20, 1, 60, 16, 48, "model", 16),       # K = 60, M = 48
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,H,K,V,M,gates,chunk", EDGES,
                         ids=[f"B{e[0]}-T{e[1]}-H{e[2]}-K{e[3]}-V{e[4]}-M{e[5]}-{e[6]}" for e in EDGES])
def test_chunk_edges(B, T, H, K, V, M, gates, chunk, dtype):
    q, k, v, s, g, hk0, hv0 = make_inputs(B, T, H, K, V, M, dtype, gates, seed=T)
    ours, ref = run_both(q, k, v, s, g, hk0, hv0, chunk_size=chunk)
    assert_close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [[1, 17, 1, 5], [16, 1, 33], [3]], ids=str)
def test_chunk_varlen_matches_naive(lengths, dtype):
    T = sum(lengths)
    H, K, V, M = 2, 16, 8, 16
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v, s, g, _, _ = make_inputs(1, T, H, K, V, M, dtype, "mixed", seed=len(lengths))
    gen = torch.Generator().manual_seed(7)
    hk0 = torch.randn(len(lengths), H, K, M, generator=gen)
    hv0 = torch.randn(len(lengths), H, M, V, generator=gen)
    ours, ref = run_both(q, k, v, s, g, hk0, hv0, cu_seqlens=cu, chunk_size=16)
    assert_close(ours, ref, dtype, f"varlen {lengths}")


def test_chunk_varlen_equals_separate_calls():
    lengths = [5, 20, 1]
    H, K, V, M = 1, 16, 16, 16
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v, s, g, _, _ = make_inputs(1, sum(lengths), H, K, V, M, torch.float32, "model", seed=3)
    dev = [x.to(DEVICE) for x in (q, k, v, s, g)]
    o, (hk, hv) = chunk_gsa(*dev, output_final_state=True, cu_seqlens=cu, chunk_size=16)
    for n in range(len(lengths)):
        a, b = cu[n].item(), cu[n + 1].item()
        o_n, (hk_n, hv_n) = chunk_gsa(*(x[:, a:b] for x in dev), output_final_state=True, chunk_size=16)
        assert rel_err(o[:, a:b], o_n) < 1e-6
        assert rel_err(hk[n:n + 1], hk_n) < 1e-6 and rel_err(hv[n:n + 1], hv_n) < 1e-6


def test_non_contiguous_inputs():
    q, k, v, s, g, hk0, hv0 = make_inputs(1, 20, 2, 16, 16, 16, torch.float32, "model", seed=5)
    # the same values laid out [B, H, T, D] and viewed back as [B, T, H, D]: non-contiguous views
    nc = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, s, g)]
    assert not nc[0].is_contiguous()
    ours, ref = run_both(*nc, hk0, hv0, chunk_size=16)
    assert_close(ours, ref, torch.float32, "non-contiguous")


def test_no_nan_on_long_steep_sequences():
    T = 4096 if ON_GPU else 200
    q, k, v, s, g, hk0, hv0 = make_inputs(1, T, 1, 16, 16, 16, torch.float32, "steep", seed=11)
    g = torch.full_like(g, -30.0)
    ins = [x.to(DEVICE).requires_grad_() for x in (q, k, v, s, g)]
    o, (hk, hv) = chunk_gsa(*ins, output_final_state=True, chunk_size=16 if not ON_GPU else None)
    (o.sum() + hk.sum() + hv.sum()).backward()
    for x in [o, hk, hv] + [x.grad for x in ins]:
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("split", [0, 1], ids=["paired", "split"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_state_walk_ownership(split, varlen):
    """Both ways of owning the state tiles (SPLIT of states_fwd / states_bwd), whichever the defaults
    pick for a shape. K = 20 and V = 40 with 32-tiles: one Hk tile and two Hv tiles, so a paired
    program past K walks only its Hv tile, and the split grid has three programs per sequence-head."""
    walk = {"BK": 32, "BV": 32, "SPLIT": split, "SEGMENT": 1, "num_warps": 4, "num_stages": 2}
    B, T = (1, 46) if varlen else (2, 37)
    q, k, v, s, g, hk0, hv0 = make_inputs(B, T, 2, 20, 40, 24, torch.float32, "mixed", seed=7 + split)
    cu = torch.tensor([0, 5, 45, 46]) if varlen else None        # lengths 5, 40, 1
    if varlen:
        hk0, hv0 = hk0.expand(3, -1, -1, -1).contiguous(), hv0.expand(3, -1, -1, -1).contiguous()
    with override({"states_fwd": walk, "states_bwd": walk}):
        ours, ref = run_both(q, k, v, s, g, hk0, hv0, cu_seqlens=cu, chunk_size=16)
        assert last_launches()["states_fwd"]["config"]["SPLIT"] == split
        assert last_launches()["states_bwd"]["config"]["SPLIT"] == split
    assert_close(ours, ref, torch.float32, f"SPLIT={split}")


def test_config_of_each_launch_is_exposed():
    q, k, v, s, g, _, _ = make_inputs(1, 8, 1, 16, 16, 16, torch.float32, "model", seed=2)
    ins = [x.to(DEVICE).requires_grad_() for x in (q, k, v, s, g)]
    chunk_gsa(*ins, chunk_size=16)[0].sum().backward()
    used = {kernel: info["config"] for kernel, info in last_launches().items()}
    for kernel in ("states_fwd", "chunk_fwd", "chunk_bwd_dscores", "states_bwd", "chunk_bwd_keys", "chunk_bwd_values"):
        assert kernel in used and used[kernel]["num_warps"] in (1, 2, 4, 8, 16)


# ---------------------------------------------------------------------------------------------------
# GPU-only: the paper's sizes (too slow for the interpreter; CI covers the same code at small sizes)

LARGE = [  # (B, T, H, K, V, M)
    (1, 4096, 1, 512, 512, 64),    # the paper's layer, long sequence
    (2, 1000, 2, 128, 256, 128),
    (1, 700, 2, 64, 64, 256),
]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="paper-size shapes run on the GPU; CI runs the small ones")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("B,T,H,K,V,M", LARGE, ids=[f"B{x[0]}-T{x[1]}-H{x[2]}-K{x[3]}-V{x[4]}-M{x[5]}" for x in LARGE])
def test_chunk_large_on_gpu(B, T, H, K, V, M, dtype):
    q, k, v, s, g, hk0, hv0 = make_inputs(B, T, H, K, V, M, dtype, "model", seed=B * T)
    ours, ref = run_both(q, k, v, s, g, hk0, hv0)
    errors = assert_close(ours, ref, dtype, "large")
    print(f"\n{dtype} B{B}-T{T}-H{H}-K{K}-V{V}-M{M}: " + " ".join(f"{n}={e:.1e}" for n, e in errors.items()))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_state_walk_keeps_float32_precision(dtype):
    """The training path's float32 states from half inputs are float32-accurate, not tf32-accurate:
    the walk splits its float32 operand into two 16-bit halves (dots.py `dot_acc`). tf32 dots left
    them ~4e-4 off at this size on the H100 (the bound here is 20x tighter than that); the split
    keeps ~2e-6. The interpreter truncates tf32 operands as the GPU does (conftest)."""
    T, K, M = (300, 128, 64) if ON_GPU else (40, 16, 16)
    q, k, v, s, g, hk0, hv0 = make_inputs(2, T, 2, K, K, M, dtype, "model", seed=11)
    ins = [x.to(DEVICE) for x in (q, k, v, s, g)]
    ins[0].requires_grad_()          # the training path: float32 states saved for a backward
    _, (hk, hv) = chunk_gsa(*ins, initial_state=(hk0.to(DEVICE), hv0.to(DEVICE)), output_final_state=True)
    _, (rhk, rhv) = naive_recurrent_gsa(*(x.double() for x in (q, k, v, s, g)), output_final_state=True,
                                        initial_state=(hk0.double(), hv0.double()))
    errors = {"hk": rel_err(hk, rhk), "hv": rel_err(hv, rhv)}
    assert max(errors.values()) < 2e-5, errors


@pytest.mark.parametrize("level", [0, 2])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_slot_scores_keep_hk_beyond_tf32(dtype, level):
    """Scale 1, no forgetting, 211 steps, K = 128: slot scores in the tens, a near one-hot softmax whose
    backward subtracts nearly equal terms. A Hypothesis draw on the H100: with q Hk in
    tf32 (Hk truncated to 11 bits) dq, dk, ds and dhk0 were 1.6e-2 to 1.8e-2 off, over the 1e-2 bound;
    chunk_fwd now takes Hk as 16-bit halves (dots.py `dot_acc_scaled`): 2.5e-3. The interpreter
    truncates tf32 operands as the GPU does (conftest), so this fails there too without the halves.
    Both levels: level 0's backward reads the forward's chunk states (Hv in 16 bits), level 2's rebuilt ones."""
    q, k, v, s, g, hk0, hv0 = make_inputs(2, 211, 1, 128, 16, 5, dtype, "zero", seed=74, initial_state=True)
    ours, ref = run_both(q, k, v, s, g, hk0, hv0, scale=1.0, chunk_size=64, seed=75, checkpoint_level=level)
    errors = assert_close(ours, ref, dtype, f"scale 1, g = 0, checkpoint_level={level}")
    print(f"\n{dtype}: " + " ".join(f"{n}={e:.1e}" for n, e in errors.items()))


def test_float16_backward_walk_takes_gradients_beyond_float16_range(monkeypatch):
    """Under float16 loss scaling the slot-score gradient dz, which the backward state walk reads in
    float32, can pass float16's 65504 while the op's own inputs and float32 state gradients are fine.
    The walk must not round it to float16 (dots.py `dot_acc`'s split would give inf). Large v and do take dz e^G
    past it here (float16 halves gave NaN); the float32 gradients of the initial states must match float64."""
    import gsa_kernels.launchers.chunk as launchers
    dtype = torch.float16
    q, k, v, s, g, hk0, hv0 = make_inputs(1, 40, 1, 16, 16, 16, dtype, "model", seed=5)
    v = (v.float() * 300).to(dtype)
    seen = []
    real = launchers.states_bwd_kernel

    class Spy:           # records the largest |dz e^G| the backward walk multiplies
        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw["DO_KEYS"]:      # the keys' walk reads dz
                    seen.append((args[2] * args[4].exp()).abs().max().item())   # dz e^G
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(launchers, "states_bwd_kernel", Spy())
    ins = [x.to(DEVICE).requires_grad_() for x in (q, k, v, s, g, hk0, hv0)]
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v, s, g, hk0, hv0)]
    o, _ = chunk_gsa(*ins[:5], initial_state=tuple(ins[5:]), chunk_size=16)
    ro, _ = naive_recurrent_gsa(*ref_in[:5], initial_state=tuple(ref_in[5:]))
    do = (torch.randn(ro.shape, generator=torch.Generator().manual_seed(3)).clamp(-2, 2) * 3e4).to(dtype)
    o.backward(do.to(DEVICE))
    ro.backward(do.double())
    assert seen and max(seen) > 65504, f"dz e^G reached only {seen}: the case does not test the range"
    errors = {"dhk0": rel_err(ins[5].grad, ref_in[5].grad), "dhv0": rel_err(ins[6].grad, ref_in[6].grad)}
    assert max(errors.values()) < BOUNDS[dtype][1], errors


def candidate_configs(kernel, K, V, M, BT, dtype, seqs):
    """Every config the sweep may pick for `kernel` at this shape and chunk size (its candidates that
    fit and are not a known miscompile), then the default. Warps and stages do nothing in the
    interpreter, so there each tile choice runs once."""
    from gsa_kernels.configs import default_config, miscompiled
    from gsa_kernels.resources import fits
    from tuning.search import enumerate_space
    space = [c for c in enumerate_space(kernel) if fits(c, K=K, V=V, M=M, BT=BT, dtype=dtype) and not miscompiled(kernel, c, BT)]
    if not ON_GPU:
        tiles = {tuple(x for n, x in c.items() if n not in ("num_warps", "num_stages")): c for c in space}
        space = [dict(c, num_warps=4, num_stages=1) for c in tiles.values()]
    return space + [default_config(kernel, K, V, M, BT, seqs)]


def config_label(cfg):
    return ",".join(f"{n}={x}" for n, x in cfg.items())


_CANDIDATE_FWD_SHAPE = (2, 242, 1, 128, 64, 5) if ON_GPU else (1, 70, 1, 40, 24, 5)
_CANDIDATE_BWD_SHAPE = (2, 242, 1, 128, 64, 16) if ON_GPU else (1, 70, 1, 40, 24, 16)


def candidate_fwd_inputs():
    """(q, k, v, s, g, hk0, hv0) of the forward candidate test: steep gates, where miscompiles showed."""
    return make_inputs(*_CANDIDATE_FWD_SHAPE, torch.float16, "steep", seed=699, initial_state=True)


def candidate_bwd_inputs():
    """(leaves, do) of the backward candidate test."""
    B, T, H, K, V, M = _CANDIDATE_BWD_SHAPE
    leaves = make_inputs(B, T, H, K, V, M, torch.float16, "model", seed=812)
    return leaves, torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(813)).to(torch.float16)


def run_forward_candidate(kernel, BT, cfg, inputs):
    """The forward candidate test's call under `cfg` for `kernel`: o."""
    q, k, v, s, g, hk0, hv0 = inputs
    ins = [x.to(DEVICE) for x in (q, k, v, s, g)]
    if kernel == "chunk_fwd":
        ins[0].requires_grad_()      # the training path's forward
    with override({kernel: cfg}), torch.set_grad_enabled(kernel == "chunk_fwd"):
        o, _ = chunk_gsa(*ins, initial_state=(hk0.to(DEVICE), hv0.to(DEVICE)), chunk_size=BT)
    assert last_launches()[kernel]["config"] == cfg, f"{kernel} did not launch: {last_launches()}"
    return o


def run_backward_candidate(kernel, BT, cfg, leaves, do):
    """The backward candidate test's call under `cfg` for `kernel`: the leaves, holding their .grad."""
    ins = [x.detach().clone().to(DEVICE).requires_grad_() for x in leaves]   # fresh .grad per config
    with override({kernel: cfg}):
        o, _ = chunk_gsa(*ins[:5], initial_state=tuple(ins[5:]), chunk_size=BT)
        o.backward(do.to(DEVICE))
    assert last_launches()[kernel]["config"] == cfg, f"{kernel} did not launch: {last_launches()}"
    return ins


def compile_candidate(task):
    """A worker of `compile_pool`: the candidate test's call once, for Triton's on-disk cache."""
    direction, kernel, BT, cfg = task
    try:
        if direction == "fwd":
            run_forward_candidate(kernel, BT, cfg, candidate_fwd_inputs())
        else:
            run_backward_candidate(kernel, BT, cfg, *candidate_bwd_inputs())
        torch.cuda.synchronize()
    except Exception:     # the test's own call meets it again and reports it
        pass


@pytest.mark.parametrize("BT", [32, 64])
@pytest.mark.parametrize("kernel", ["chunk_fwd", "chunk_fwd_compact"])
def test_every_forward_candidate_config_agrees(kernel, BT, compile_pool):
    """Every config the sweep may pick for a forward chunk kernel gives the right forward, and so does
    the default. On the H100 both kernels at chunk 64 with 8 warps put rows up to 0.5
    off at this steep-gate draw, not the same rows twice, or hit illegal memory accesses: a Triton
    miscompile (configs.miscompiled), which the sweep prunes and launch_config never launches."""
    B, T, H, K, V, M = _CANDIDATE_FWD_SHAPE
    dtype = torch.float16
    inputs = candidate_fwd_inputs()
    q, k, v, s, g, hk0, hv0 = inputs
    space = candidate_configs(kernel, K, V, M, BT, dtype, seqs=B * H)
    compile_pool(compile_candidate, [("fwd", kernel, BT, cfg) for cfg in space])
    ro, _ = naive_recurrent_gsa(*(x.double() for x in (q, k, v, s, g)), initial_state=(hk0.double(), hv0.double()))
    bad = {}
    for cfg in space:
        err = rel_err(run_forward_candidate(kernel, BT, cfg, inputs), ro)
        if err > BOUNDS[dtype][0]:
            bad[config_label(cfg)] = f"{err:.1e}"
    assert not bad, f"{kernel} chunk {BT}: {len(bad)} of {len(space)} configs off: {bad}"


_candidate_bwd_reference = {}


def candidate_bwd_case():
    """The inputs, the upstream gradient and the float64 gradients of the backward candidate test,
    built once: the float64 autograd of the recurrence is the slow part, and every config of every
    kernel checks against the same numbers."""
    if not _candidate_bwd_reference:
        leaves, do = candidate_bwd_inputs()
        ref = [x.double().requires_grad_() for x in leaves]
        ro, _ = naive_recurrent_gsa(*ref[:5], initial_state=tuple(ref[5:]))
        ro.backward(do.double())
        _candidate_bwd_reference.update(leaves=leaves, do=do, grads=[x.grad for x in ref])
    return _candidate_bwd_reference


@pytest.mark.parametrize("BT", [32, 64])
@pytest.mark.parametrize("kernel", ["chunk_bwd_dscores", "chunk_bwd_keys", "chunk_bwd_values"])
def test_every_backward_chunk_candidate_config_agrees(kernel, BT, compile_pool):
    """The backward twin of the test above: every config the sweep may pick for a backward chunk
    kernel, and the default, gives every gradient within the bound. Their default at chunk 64 is
    8 warps, the warp count that Triton 3.6 miscompiles in the forward chunk kernels on the H100."""
    B, T, H, K, V, M = _CANDIDATE_BWD_SHAPE
    dtype = torch.float16
    case = candidate_bwd_case()
    space = candidate_configs(kernel, K, V, M, BT, dtype, seqs=B * H)
    compile_pool(compile_candidate, [("bwd", kernel, BT, cfg) for cfg in space])
    bad = {}
    for cfg in space:
        ins = run_backward_candidate(kernel, BT, cfg, case["leaves"], case["do"])
        errors = {n: rel_err(x.grad, r) for n, x, r in zip(GRAD_NAMES, ins, case["grads"])}
        worst = max(errors, key=errors.get)
        if errors[worst] > BOUNDS[dtype][1]:
            bad[config_label(cfg)] = f"{worst} {errors[worst]:.1e}"
    assert not bad, f"{kernel} chunk {BT}: {len(bad)} of {len(space)} configs off: {bad}"


# ---------------------------------------------------------------------------------------------------
# Forward only (no input requires grad): half inputs take the scaled float16 chunk states


def forward_only_both(q, k, v, s, g, hk0, hv0, monkeypatch, chunk_size=None, cu_seqlens=None):
    """(o, hk, hv) of a no-grad chunk_gsa call and of the float64 naive recurrence; checks that the
    call took the compact path (launchers.chunk.chunk_gsa_fwd with both states scaled float16)."""
    import gsa_kernels.chunk as chunk_mod
    calls = []
    real = chunk_mod.chunk_gsa_fwd
    monkeypatch.setattr(chunk_mod, "chunk_gsa_fwd", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    dev = [x.to(DEVICE) for x in (q, k, v, s, g)]
    h0 = None if hk0 is None else (hk0.to(DEVICE), hv0.to(DEVICE))
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    cu_dev = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
    with torch.no_grad():
        o, (hk, hv) = chunk_gsa(*dev, initial_state=h0, output_final_state=True, cu_seqlens=cu_dev, **extra)
    assert calls and calls[0].get("compact") == (True, True), "a no-grad half-precision call must use compact states"
    ref_h0 = None if hk0 is None else (hk0.double(), hv0.double())
    ro, (rhk, rhv) = naive_recurrent_gsa(*(x.double() for x in (q, k, v, s, g)), initial_state=ref_h0,
                                         output_final_state=True, cu_seqlens=cu_seqlens)
    return {"o": o, "hk": hk, "hv": hv}, {"o": ro, "hk": rhk, "hv": rhv}


@settings(max_examples=25 if ON_GPU else 6, report_multiple_bugs=False)
@given(B=st.integers(1, 2), T=st.integers(1, T_MAX), H=st.integers(1, 2),
       K=st.sampled_from(D_SIZES), V=st.sampled_from(D_SIZES), M=st.sampled_from(M_SIZES),
       dtype=st.sampled_from(HALF), gates=st.sampled_from(["model", "zero", "steep", "mixed"]),
       initial_state=st.booleans(), chunk_size=st.sampled_from(CHUNKS), seed=st.integers(0, 2**16))
def test_forward_only_matches_naive(B, T, H, K, V, M, dtype, gates, initial_state, chunk_size, seed):
    with pytest.MonkeyPatch.context() as mp:
        q, k, v, s, g, hk0, hv0 = make_inputs(B, T, H, K, V, M, dtype, gates, seed, initial_state)
        ours, ref = forward_only_both(q, k, v, s, g, hk0, hv0, mp, chunk_size=chunk_size)
    assert_close(ours, ref, dtype, f"forward only B{B}-T{T}-H{H}-K{K}-V{V}-M{M}-{dtype}-{gates}")


def test_forward_only_varlen_and_large_states(monkeypatch):
    """Varlen with a length-1 sequence, no forgetting and states far from 1 (initial states x 1e4):
    the per-row scales must absorb the magnitude (float16 alone tops out at 65504)."""
    dtype = torch.float16
    q, k, v, s, g, hk0, hv0 = make_inputs(1, 41, 2, 16, 24, 20, dtype, "zero", seed=7, initial_state=True)
    cu = torch.tensor([0, 1, 18, 41])
    hk0 = torch.randn(3, 2, 16, 20, generator=torch.Generator().manual_seed(1)) * 1e4
    hv0 = torch.randn(3, 2, 20, 24, generator=torch.Generator().manual_seed(2)) * 1e4
    ours, ref = forward_only_both(q, k, v, s, g, hk0, hv0, monkeypatch, chunk_size=16, cu_seqlens=cu)
    assert_close(ours, ref, dtype, "forward only, varlen, large states")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="paper-size shapes run on the GPU; CI runs the small ones")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gates", ["model", "zero"])
def test_forward_only_large_on_gpu(dtype, gates, monkeypatch):
    """The paper's layer over a long sequence, with and without forgetting (the states grow with T at
    g = 0)."""
    q, k, v, s, g, hk0, hv0 = make_inputs(1, 4096, 1, 512, 512, 64, dtype, gates, seed=4096)
    ours, ref = forward_only_both(q, k, v, s, g, hk0, hv0, monkeypatch)
    errors = assert_close(ours, ref, dtype, f"forward only large {gates}")
    print(f"\n{dtype} {gates}: " + " ".join(f"{n}={e:.1e}" for n, e in errors.items()))


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument

def _good(dtype=torch.float32):
    return [x.to(DEVICE) for x in make_inputs(1, 8, 2, 16, 16, 16, dtype, "model", seed=0)[:5]]


@pytest.mark.parametrize("case", [
    "k_shape", "v_batch", "s_slots", "g_dtype", "q_3d", "int_dtype", "cu_float", "cu_batch",
    "cu_start", "cu_decreasing", "cu_end", "hk0_shape", "hv0_shape", "chunk_size", "unknown_kw"])
def test_bad_input_errors(case):
    q, k, v, s, g = _good()
    kw = {}
    if case == "k_shape":
        k, err, words = k[..., :8], ValueError, "k "
    elif case == "v_batch":
        v, err, words = torch.cat([v, v]), ValueError, "v "
    elif case == "s_slots":
        s, err, words = s[..., :4], ValueError, "s "
    elif case == "g_dtype":
        g, err, words = g.double(), TypeError, "g "
    elif case == "q_3d":
        q, err, words = q[0], ValueError, "q "
    elif case == "int_dtype":
        q, err, words = q.to(torch.int32), TypeError, "q "
    elif case == "cu_float":
        kw["cu_seqlens"], err, words = torch.tensor([0.0, 8.0]), TypeError, "cu_seqlens"
    elif case == "cu_batch":
        q, k, v, s, g = (torch.cat([x, x]) for x in (q, k, v, s, g))
        kw["cu_seqlens"], err, words = torch.tensor([0, 8], dtype=torch.int32), ValueError, "cu_seqlens"
    elif case == "cu_start":
        kw["cu_seqlens"], err, words = torch.tensor([1, 8]), ValueError, "start at 0"
    elif case == "cu_decreasing":
        kw["cu_seqlens"], err, words = torch.tensor([0, 5, 3, 8]), ValueError, "non-decreasing"
    elif case == "cu_end":
        kw["cu_seqlens"], err, words = torch.tensor([0, 5, 7]), ValueError, "end at T"
    elif case == "hk0_shape":
        kw["initial_state"] = (torch.zeros(1, 2, 16, 8, device=DEVICE), None)
        err, words = ValueError, "hk0"
    elif case == "hv0_shape":
        kw["initial_state"] = (None, torch.zeros(2, 2, 16, 16, device=DEVICE))
        err, words = ValueError, "hv0"
    elif case == "chunk_size":
        kw["chunk_size"], err, words = 48, ValueError, "chunk_size"
    else:
        kw["head_first"], err, words = True, TypeError, "head_first"
    with pytest.raises(err, match=words):
        chunk_gsa(q, k, v, s, g, **kw)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU-without-interpreter error; meaningful only off-GPU")
def test_cpu_tensors_without_interpreter_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        chunk_gsa(*_good())
