"""fused_recurrent_gsa (Triton, token by token) against the float64 naive recurrence: forward, final
states and every gradient, within the bounds of docs/contract.md, "Numerical contract".

Runs on CUDA when present, in Triton's interpreter on CPU tensors otherwise (tests/conftest.py); the
GPU adds bfloat16 and the paper's sizes. The decode step (T = 1 without gradients) has its own file,
tests/test_decode.py; here T = 1 appears with gradients, which takes the training kernels.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICE, ON_GPU
from gsa_kernels import fused_recurrent_gsa, last_launches
from reference import naive_recurrent_gsa
from test_chunk import DTYPES, GRAD_NAMES, assert_close, backward_both, fp32_baseline, make_inputs, rel_err


def run_both(q, k, v, s, g, hk0, hv0, scale=None, cu_seqlens=None, seed=1):
    """Forward + backward of fused_recurrent_gsa on DEVICE and of the float64 naive recurrence on the
    same (already rounded) inputs, with the same random upstream gradients of o and both final states."""
    gen = torch.Generator().manual_seed(seed)
    has_h0 = hk0 is not None
    ins = [q, k, v, s, g] + ([hk0, hv0] if has_h0 else [])
    ours_in = [x.detach().clone().to(DEVICE).requires_grad_() for x in ins]
    ref_in = [x.detach().double().requires_grad_() for x in ins]
    kw = dict(scale=scale, output_final_state=True)
    cu_dev = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
    o, (hk, hv) = fused_recurrent_gsa(*ours_in[:5], initial_state=tuple(ours_in[5:]) if has_h0 else None,
                                      cu_seqlens=cu_dev, **kw)
    ro, (rhk, rhv) = naive_recurrent_gsa(*ref_in[:5], initial_state=tuple(ref_in[5:]) if has_h0 else None,
                                         cu_seqlens=cu_seqlens, **kw)
    ours, ref, (do, dhk, dhv) = backward_both((o, hk, hv), (ro, rhk, rhv), ours_in, ref_in, gen)
    if q.dtype == torch.float32:    # PyTorch's float32 recurrence: the yardstick of ill-conditioned inputs
        ref["fp32_baseline"] = fp32_baseline(naive_recurrent_gsa, ins, ref, (do, dhk, dhv),
                                             dict(kw, cu_seqlens=cu_seqlens))
    return ours, ref


# ---------------------------------------------------------------------------------------------------
# Hypothesis: drawn shapes, dtypes, gates, scale, initial states

if ON_GPU:
    T_MAX, D_SIZES, M_SIZES = 100, [16, 60, 64, 100, 128], [5, 16, 48, 64, 100]
else:
    T_MAX, D_SIZES, M_SIZES = 12, [4, 16, 24], [5, 16, 20]


@settings(max_examples=40 if ON_GPU else 8, report_multiple_bugs=False)
@given(B=st.integers(1, 2), T=st.integers(1, T_MAX), H=st.integers(1, 2),
       K=st.sampled_from(D_SIZES), V=st.sampled_from(D_SIZES), M=st.sampled_from(M_SIZES),
       dtype=st.sampled_from(DTYPES), gates=st.sampled_from(["model", "zero", "steep", "mixed"]),
       scale=st.sampled_from([None, 1.0, 0.3]), initial_state=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_recurrent_matches_naive(B, T, H, K, V, M, dtype, gates, scale, initial_state, seed):
    q, k, v, s, g, hk0, hv0 = make_inputs(B, T, H, K, V, M, dtype, gates, seed, initial_state)
    ours, ref = run_both(q, k, v, s, g, hk0, hv0, scale=scale, seed=seed + 1)
    assert_close(ours, ref, dtype, f"B{B}-T{T}-H{H}-K{K}-V{V}-M{M}-{dtype}-{gates}")


def test_ill_conditioned_dq_is_judged_against_float32_pytorch():
    """Found by Hypothesis on the H100: T = 1, steep gates, scale 1, initial states. The
    slot softmax is near one-hot, so dq cancels: PyTorch's own float32 recurrence gets dq 1.4e-4
    against float64, over the 1e-5 bound, and so does any float32 implementation. assert_close then
    allows twice that baseline error (as for chunk_gsa); the kernel must still stay within it."""
    q, k, v, s, g, hk0, hv0 = make_inputs(1, 1, 2, 128, 128, 16, torch.float32, "steep", 26066, True)
    ours, ref = run_both(q, k, v, s, g, hk0, hv0, scale=1.0, seed=26067)
    assert ref["fp32_baseline"]()["dq"] > 1e-5           # the input really is ill-conditioned
    assert_close(ours, ref, torch.float32, "ill-conditioned dq")


# ---------------------------------------------------------------------------------------------------
# Explicit edges

EDGES = [  # (B, T, H, K, V, M, gates, initial_state)
    (2, 1, 2, 16, 8, 16, "model", True),       # T = 1 with gradients: the training kernels, not decode
    (1, 1, 1, 16, 16, 5, "model", False),      # T = 1, no initial state (dg is exactly 0 in the math)
    (1, 30, 1, 16, 16, 16, "steep", True),     # g down to -30: no division by exp(g) anywhere
    (1, 12, 1, 16, 16, 16, "zero", True),      # g = 0: nothing forgotten
    (1, 10, 1, 100, 72, 48, "mixed", True),    # several K, V and slot tiles: the ds parts are summed
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,H,K,V,M,gates,h0", EDGES,
                         ids=[f"B{e[0]}-T{e[1]}-H{e[2]}-K{e[3]}-V{e[4]}-M{e[5]}-{e[6]}" for e in EDGES])
def test_fused_recurrent_edges(B, T, H, K, V, M, gates, h0, dtype):
    q, k, v, s, g, hk0, hv0 = make_inputs(B, T, H, K, V, M, dtype, gates, seed=T + K, initial_state=h0)
    ours, ref = run_both(q, k, v, s, g, hk0, hv0)
    assert_close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [[1, 6, 0, 4], [9]], ids=str)
def test_fused_recurrent_varlen_matches_naive(lengths, dtype):
    """Packed sequences (one of length 0: its final state is its initial state) with their own states."""
    T = sum(lengths)
    H, K, V, M = 2, 16, 8, 12
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v, s, g, _, _ = make_inputs(1, T, H, K, V, M, dtype, "mixed", seed=len(lengths))
    gen = torch.Generator().manual_seed(7)
    hk0 = torch.randn(len(lengths), H, K, M, generator=gen)
    hv0 = torch.randn(len(lengths), H, M, V, generator=gen)
    ours, ref = run_both(q, k, v, s, g, hk0, hv0, cu_seqlens=cu)
    assert_close(ours, ref, dtype, f"varlen {lengths}")


def test_non_contiguous_inputs():
    q, k, v, s, g, hk0, hv0 = make_inputs(1, 8, 2, 16, 16, 16, torch.float32, "model", seed=5)
    nc = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, s, g)]
    assert not nc[0].is_contiguous()
    ours, ref = run_both(*nc, hk0, hv0)
    assert_close(ours, ref, torch.float32, "non-contiguous")


def test_no_nan_on_long_steep_sequences():
    T = 2048 if ON_GPU else 100
    q, k, v, s, g, hk0, hv0 = make_inputs(1, T, 1, 8, 8, 4, torch.float32, "steep", seed=11)
    g = torch.full_like(g, -30.0)
    ins = [x.to(DEVICE).requires_grad_() for x in (q, k, v, s, g)]
    o, (hk, hv) = fused_recurrent_gsa(*ins, output_final_state=True)
    (o.sum() + hk.sum() + hv.sum()).backward()
    for x in [o, hk, hv] + [x.grad for x in ins]:
        assert torch.isfinite(x).all()


def test_gradients_without_final_state_gradient():
    """output_final_state=False: the loss reaches only o (the final-state terms of dg drop out)."""
    q, k, v, s, g, hk0, hv0 = make_inputs(1, 7, 1, 16, 16, 8, torch.float32, "mixed", seed=3)
    ours_in = [x.detach().clone().to(DEVICE).requires_grad_() for x in (q, k, v, s, g, hk0, hv0)]
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v, s, g, hk0, hv0)]
    o, (hk, hv) = fused_recurrent_gsa(*ours_in[:5], initial_state=tuple(ours_in[5:]))
    assert hk is None and hv is None
    ro, _ = naive_recurrent_gsa(*ref_in[:5], initial_state=tuple(ref_in[5:]))
    w = torch.randn(ro.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (ro * w).sum().backward()
    (o * w.to(DEVICE, torch.float32)).sum().backward()
    for name, a, b in zip(GRAD_NAMES, ours_in, ref_in):
        assert rel_err(a.grad, b.grad) <= 1e-5, name


def test_initial_state_is_not_written():
    q, k, v, s, g, hk0, hv0 = make_inputs(1, 5, 1, 16, 16, 8, torch.float32, "model", seed=4)
    dev = [x.to(DEVICE) for x in (q, k, v, s, g)]
    hk0, hv0 = hk0.to(DEVICE), hv0.to(DEVICE)
    before = hk0.clone(), hv0.clone()
    with torch.no_grad():
        _, (hk, hv) = fused_recurrent_gsa(*dev, initial_state=(hk0, hv0), output_final_state=True)
    assert torch.equal(hk0, before[0]) and torch.equal(hv0, before[1])
    assert hk.data_ptr() != hk0.data_ptr() and hv.data_ptr() != hv0.data_ptr()


def test_inplace_and_out_on_a_sequence():
    """inplace / out= for T > 1 (a serving prefill): the same states as the default, in the given buffers."""
    q, k, v, s, g, hk0, hv0 = make_inputs(2, 6, 2, 16, 8, 12, torch.float32, "mixed", seed=8)
    dev = [x.to(DEVICE) for x in (q, k, v, s, g)]
    hk0, hv0 = hk0.to(DEVICE), hv0.to(DEVICE)
    with torch.no_grad():
        o_ref, (hk_ref, hv_ref) = fused_recurrent_gsa(*dev, initial_state=(hk0, hv0), output_final_state=True)
        bufs = torch.empty_like(hk0), torch.empty_like(hv0)
        o_out, (hk_out, hv_out) = fused_recurrent_gsa(*dev, initial_state=(hk0, hv0), out=bufs)
        assert hk_out is bufs[0] and hv_out is bufs[1]
        o_in, (hk_in, hv_in) = fused_recurrent_gsa(*dev, initial_state=(hk0, hv0), inplace=True)
        assert hk_in is hk0 and hv_in is hv0
    for got in (o_out, o_in):
        assert rel_err(got, o_ref) <= 1e-6
    for got_k, got_v in ((hk_out, hv_out), (hk0, hv0)):
        assert rel_err(got_k, hk_ref) <= 1e-6 and rel_err(got_v, hv_ref) <= 1e-6


# ---------------------------------------------------------------------------------------------------
# Grouped query heads in the kernels: one state walked per kv head, read by its group's query heads
# (tests/test_grouped_heads.py checks the op with gradients; here the inference-only buffers)

def grouped_inputs(T, group, H=2, K=16, V=8, M=12, dtype=torch.float32, seed=0, N=1):
    """q with H * group heads, the rest with H; one (B = 1, packed) or N = B rows; states per kv head."""
    B = 1 if N > 1 else N
    q, *_ = make_inputs(B, T, H * group, K, V, M, dtype, "mixed", seed=seed + 1)
    _, k, v, s, g, _, _ = make_inputs(B, T, H, K, V, M, dtype, "mixed", seed=seed)
    gen = torch.Generator().manual_seed(seed + 2)
    return q, k, v, s, g, torch.randn(N, H, K, M, generator=gen), torch.randn(N, H, M, V, generator=gen)


@pytest.mark.parametrize("group,dtype,lengths", [(2, torch.float32, None), (4, torch.float16, [4, 0, 5]),
                                                 (3, torch.float32, [9])], ids=str)
def test_grouped_heads_inference_walks_per_kv_head(group, dtype, lengths):
    """T > 1 without gradients: the two forward launches over the kv heads, into out= buffers and in
    place, against the float64 recurrence (packed sequences, one of them empty)."""
    T = 9
    cu = None if lengths is None else torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v, s, g, hk0, hv0 = grouped_inputs(T, group, dtype=dtype, seed=group, N=1 if cu is None else len(lengths))
    ro, (rhk, rhv) = naive_recurrent_gsa(*(x.double() for x in (q, k, v, s, g)), cu_seqlens=cu,
                                         initial_state=(hk0.double(), hv0.double()), output_final_state=True)
    dev = [x.to(DEVICE) for x in (q, k, v, s, g)]
    cu = None if cu is None else cu.to(DEVICE)
    hk0, hv0 = hk0.to(DEVICE), hv0.to(DEVICE)
    o_bound, bound = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 1e-2)}[dtype]
    with torch.no_grad():
        bufs = torch.empty_like(hk0), torch.empty_like(hv0)
        o, (hk, hv) = fused_recurrent_gsa(*dev, initial_state=(hk0, hv0), cu_seqlens=cu, out=bufs)
        assert hk is bufs[0] and o.shape == q.shape[:3] + (8,)
        assert rel_err(o, ro) <= o_bound and rel_err(hk, rhk) <= bound and rel_err(hv, rhv) <= bound
        o, _ = fused_recurrent_gsa(*dev, initial_state=(hk0, hv0), cu_seqlens=cu, inplace=True)
    assert rel_err(o, ro) <= o_bound and rel_err(hk0, rhk) <= bound and rel_err(hv0, rhv) <= bound


def test_config_of_each_launch_is_exposed():
    q, k, v, s, g, _, _ = make_inputs(1, 3, 1, 16, 16, 16, torch.float32, "model", seed=2)
    ins = [x.to(DEVICE).requires_grad_() for x in (q, k, v, s, g)]
    fused_recurrent_gsa(*ins)[0].sum().backward()
    used = {kernel: info["config"] for kernel, info in last_launches().items()}
    for kernel in ("recurrent_fwd_keys", "recurrent_fwd_values", "recurrent_bwd_dp", "recurrent_bwd_keys",
                   "recurrent_bwd_values", "recurrent_bwd_gates"):
        assert kernel in used and used[kernel]["num_warps"] in (1, 2, 4, 8, 16)


# ---------------------------------------------------------------------------------------------------
# GPU-only: the paper's sizes

LARGE = [  # (B, T, H, K, V, M)
    (2, 64, 4, 512, 512, 64),      # the paper's layer, at the layer's switch length
    (1, 300, 2, 128, 256, 100),
    (2, 50, 2, 64, 64, 256),
]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="paper-size shapes run on the GPU; CI runs the small ones")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("B,T,H,K,V,M", LARGE, ids=[f"B{x[0]}-T{x[1]}-H{x[2]}-K{x[3]}-V{x[4]}-M{x[5]}" for x in LARGE])
def test_fused_recurrent_large_on_gpu(B, T, H, K, V, M, dtype):
    q, k, v, s, g, hk0, hv0 = make_inputs(B, T, H, K, V, M, dtype, "model", seed=B * T)
    ours, ref = run_both(q, k, v, s, g, hk0, hv0)
    errors = assert_close(ours, ref, dtype, "large")
    print(f"\n{dtype} B{B}-T{T}-H{H}-K{K}-V{V}-M{M}: " + " ".join(f"{n}={e:.1e}" for n, e in errors.items()))


# ---------------------------------------------------------------------------------------------------
# reverse=True (FLA 0.6.0's fused_recurrent_gsa): the recurrence from the last token to the first

REVERSE_CASES = [(dt, abc, lengths) for dt in DTYPES for abc in (False, True) for lengths in (None, [3, 1, 0, 9])]
if not ON_GPU:    # CI's time: a cover of each value
    REVERSE_CASES = [(torch.float32, False, None), (torch.float16, True, [3, 1, 0, 9]),
                     (torch.float32, True, [3, 1, 0, 9])]


@pytest.mark.parametrize("dtype,abc,lengths", REVERSE_CASES, ids=str)
def test_reverse_matches_naive(dtype, abc, lengths):
    """Forward, final states and every gradient against the float64 recurrence run backwards in time,
    dense and packed (a sequence of one token and an empty one among them), gates or ABC mode."""
    from test_abc_mode import _inputs, run_op_and_naive
    T = 13 if lengths is None else sum(lengths)
    N = 1 if lengths is None else len(lengths)
    q, k, v, s, g, hk0, hv0 = _inputs(T, dtype=dtype, seed=21, gates="abc" if abc else "model", N=N)
    cu = None if lengths is None else torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    ours, ref, _ = run_op_and_naive(fused_recurrent_gsa, q, k, v, s, g, hk0, hv0, cu_seqlens=cu,
                                    both_kw={"reverse": True})
    assert_close(ours, ref, dtype, "reverse=True")


def test_naive_reverse_is_the_forward_recurrence_on_reversed_time():
    """The reference's reverse against its own forward on explicitly reversed inputs (float64), with
    the gates (or ABC's weights) of forward time: the two reference paths agree."""
    q, k, v, s, g, hk0, hv0 = (x.double() for x in make_inputs(1, 11, 2, 8, 8, 4, torch.float32, "mixed", seed=3))
    flip = lambda x: x.flip(1)   # noqa: E731
    o, (hk, hv) = naive_recurrent_gsa(q, k, v, s, g, initial_state=(hk0, hv0), output_final_state=True,
                                      reverse=True)
    fo, (fhk, fhv) = naive_recurrent_gsa(flip(q), flip(k), flip(v), flip(s), flip(g), initial_state=(hk0, hv0),
                                         output_final_state=True)
    for a, b in ((o, flip(fo)), (hk, fhk), (hv, fhv)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_reverse_inference_paths():
    """Without gradients (the two-launch forward) and in place: the same outputs as the training path."""
    (q, k, v, s, g), (hk0, hv0) = _good()
    o, (hk, hv) = fused_recurrent_gsa(q, k, v, s, g, initial_state=(hk0, hv0), output_final_state=True,
                                      reverse=True)
    state = (hk0.clone(), hv0.clone())
    with torch.no_grad():
        o2, (hk2, hv2) = fused_recurrent_gsa(q, k, v, s, g, initial_state=state, reverse=True, inplace=True)
    assert hk2 is state[0] and hv2 is state[1]
    torch.testing.assert_close(o2, o)
    torch.testing.assert_close(hk2, hk)
    torch.testing.assert_close(hv2, hv)


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument

def _good():
    q, k, v, s, g, hk0, hv0 = make_inputs(1, 4, 2, 16, 16, 8, torch.float32, "model", seed=0)
    return [x.to(DEVICE) for x in (q, k, v, s, g)], (hk0.to(DEVICE), hv0.to(DEVICE))


@pytest.mark.parametrize("case", ["k_shape", "hk0_shape", "hv0_dtype", "inplace_no_state", "inplace_grad",
                                  "inplace_half_state", "out_shape", "out_dtype", "out_and_inplace",
                                  "reverse", "unknown_kw"])
def test_bad_input_errors(case):
    (q, k, v, s, g), (hk0, hv0) = _good()
    kw = {}
    if case == "k_shape":
        k, err, words = k[..., :8], ValueError, "k "
    elif case == "hk0_shape":
        kw["initial_state"], err, words = (hk0[..., :4], hv0), ValueError, "hk0"
    elif case == "hv0_dtype":
        kw["initial_state"], err, words = (hk0, hv0.to(torch.int32)), TypeError, "hv0"
    elif case == "inplace_no_state":
        kw["inplace"], err, words = True, ValueError, "initial_state"
    elif case == "inplace_grad":
        q = q.requires_grad_()
        kw.update(inplace=True, initial_state=(hk0, hv0))
        err, words = ValueError, "inference"
    elif case == "inplace_half_state":
        kw.update(inplace=True, initial_state=(hk0.half(), hv0))
        err, words = ValueError, "out\\[0\\]"
    elif case == "out_shape":
        kw["out"], err, words = (torch.empty_like(hk0), torch.empty_like(hk0)), ValueError, "out\\[1\\]"
    elif case == "out_dtype":
        kw["out"], err, words = (hk0.half(), torch.empty_like(hv0)), ValueError, "out\\[0\\]"
    elif case == "out_and_inplace":
        kw.update(inplace=True, out=(hk0, hv0), initial_state=(hk0, hv0))
        err, words = ValueError, "inplace"
    elif case == "reverse":       # a tensor where FLA's order has reverse: cu_seqlens one place later
        kw["reverse"], err, words = torch.tensor([0, 4], dtype=torch.int32), TypeError, "reverse must be a bool"
    else:
        kw["head_first"], err, words = True, TypeError, "head_first"
    with pytest.raises(err, match=words):
        fused_recurrent_gsa(q, k, v, s, g, **kw)
