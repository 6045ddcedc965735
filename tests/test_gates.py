"""Gates at the extremes of GSA's domain g in [-inf, 0]: exact resets (g = -inf), finite gates of any
size, and mixtures of both with ordinary gates. chunk_gsa against the float64 recurrence, forward and
every gradient, with the bounds of docs/contract.md, "Numerical contract" (tests/test_chunk.py
`assert_close`).

g = -inf at a token is an exact reset of that slot: exp(g) = 0, so both memories forget everything
before it (documents packed without cu_seqlens). The chunk kernels sum gates below -FORGET_ALL as
-FORGET_ALL (kernels/cumsum.py), where every decay across them is exactly 0 in float32 too.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICE, ON_GPU
from gsa_kernels import chunk_gsa
from test_chunk import DTYPES, assert_close, make_inputs, run_both

INF = float("-inf")
CHUNKS = [16, 32, 64] if ON_GPU else [16, 64]


def _gates(g, case):
    """g [B, T, H, M] (model-like) with the extreme values of `case` written in."""
    g = g.clone()
    T = g.shape[1]
    t = T // 2
    if case == "reset-one-token":               # every slot reset at one token mid-chunk
        g[:, t] = INF
    elif case == "reset-some-slots":            # half the slots reset, at two tokens
        g[:, t, :, ::2] = INF
        g[:, T - 3, :, 1::2] = INF
    elif case == "reset-everywhere":
        g.fill_(INF)
    elif case.startswith("huge-one-token"):     # one finite gate of -1e4 / -1e8 / -1e38
        g[:, t] = max(-float(case.split("=")[1]), torch.finfo(g.dtype).min)
    elif case == "huge-everywhere":             # the most negative finite value of the dtype
        g.fill_(torch.finfo(g.dtype).min)
    elif case == "reset-first-token":           # a reset at t = 0 cancels the initial state
        g[:, 0] = INF
    else:
        raise ValueError(case)
    return g


CASES = ["reset-one-token", "reset-some-slots", "reset-everywhere", "huge-one-token=1e4",
         "huge-one-token=1e8", "huge-one-token=1e38", "huge-everywhere", "reset-first-token"]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("case", CASES)
def test_extreme_gates_match_the_recurrence_float32(case, chunk):
    """float32 within 1e-5 of the float64 recurrence for o, the final states and every gradient."""
    q, k, v, s, g, hk0, hv0 = make_inputs(1, 80, 1, 16, 16, 16, torch.float32, "model", seed=3)
    ours, ref = run_both(q, k, v, s, _gates(g, case), hk0, hv0, chunk_size=chunk)
    assert_close(ours, ref, torch.float32, f"{case} chunk {chunk}")


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("case", ["reset-one-token", "reset-some-slots", "huge-everywhere", "reset-first-token"])
def test_extreme_gates_match_the_recurrence_half(case, dtype):
    q, k, v, s, g, hk0, hv0 = make_inputs(1, 80, 1, 16, 16, 16, dtype, "model", seed=4)
    ours, ref = run_both(q, k, v, s, _gates(g, case), hk0, hv0, chunk_size=32 if ON_GPU else 16)
    assert_close(ours, ref, dtype, case)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_reset_at_the_last_token_leaves_exactly_that_tokens_write(chunk):
    """With every slot reset at the last token, the final states are that token's write alone:
    hk = k_T s_T^T, hv = s_T v_T^T, bit for bit (every other decay is exactly 0, not merely tiny)."""
    q, k, v, s, g, hk0, hv0 = make_inputs(1, 50, 2, 16, 8, 16, torch.float32, "zero", seed=5)
    g[:, -1] = INF
    dev = [x.to(DEVICE) for x in (q, k, v, s, g)]
    _, (hk, hv) = chunk_gsa(*dev, initial_state=(hk0.to(DEVICE), hv0.to(DEVICE)), output_final_state=True,
                            chunk_size=chunk)
    kT, vT, sT = k[0, -1], v[0, -1], s[0, -1]                       # [H, K], [H, V], [H, M]
    assert torch.equal(hk[0].cpu(), kT[:, :, None] * sT[:, None, :])
    assert torch.equal(hv[0].cpu(), sT[:, :, None] * vT[:, None, :])


def _mixed_gates(shape, seed, p_reset, p_huge, p_zero):
    """Model-like gates with resets (-inf), huge finite gates (-1e2 .. -1e30) and exact zeros mixed in."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.nn.functional.logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64)) / 8
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    huge = -(10.0 ** (2 + 28 * torch.rand(shape, generator=gen, dtype=torch.float64)))
    g = torch.where(u < p_reset, INF, g)
    g = torch.where((u >= p_reset) & (u < p_reset + p_huge), huge, g)
    g = torch.where((u >= p_reset + p_huge) & (u < p_reset + p_huge + p_zero), 0.0, g)
    return g


if ON_GPU:
    T_MAX, D_SIZES, M_SIZES = 300, [16, 64, 100], [5, 16, 64]
else:
    T_MAX, D_SIZES, M_SIZES = 70, [8, 16], [5, 16]


# Resets and huge gates are up to 1% of gate values each, at chunks up to 32 (the default): a few per
# chunk and slot at most. Each one in a chunk widens the float32 cumulative gate sum by FORGET_ALL,
# and the gates after k of them keep a relative precision of about 1e-7 * 104 k (kernels/cumsum.py);
# denser ones, or chunk 64, are the known limit below. Against the contract's plain bounds: the float32
# recurrence itself is accurate on these inputs, so PyTorch's float32 chunked form (which shares the
# limit) is no yardstick here.
@settings(max_examples=30 if ON_GPU else 8, report_multiple_bugs=False)
@given(B=st.integers(1, 2), T=st.integers(1, T_MAX), H=st.integers(1, 2), K=st.sampled_from(D_SIZES),
       V=st.sampled_from(D_SIZES), M=st.sampled_from(M_SIZES), dtype=st.sampled_from(DTYPES),
       p_reset=st.sampled_from([0.0, 0.005, 0.01]), p_huge=st.sampled_from([0.0, 0.005, 0.01]),
       p_zero=st.sampled_from([0.0, 0.3]), initial_state=st.booleans(), chunk_size=st.sampled_from([16, 32]),
       seed=st.integers(0, 2 ** 16))
def test_chunk_matches_naive_with_mixed_extreme_gates(B, T, H, K, V, M, dtype, p_reset, p_huge, p_zero,
                                                      initial_state, chunk_size, seed):
    q, k, v, s, _, hk0, hv0 = make_inputs(B, T, H, K, V, M, dtype, "model", seed, initial_state)
    g = _mixed_gates((B, T, H, M), seed, p_reset, p_huge, p_zero).to(dtype)
    ours, ref = run_both(q, k, v, s, g, hk0, hv0, chunk_size=chunk_size, seed=seed + 1)
    ref.pop("fp32_baseline", None)
    assert_close(ours, ref, dtype, f"B{B}-T{T}-H{H}-K{K}-V{V}-M{M}-{dtype}-resets {p_reset}/{p_huge}/{p_zero}")


@pytest.mark.xfail(strict=True, reason="known limit: many resets in one chunk and slot cost float32 "
                   "precision (kernels/cumsum.py); a fix keeps G in two float32 parts")
def test_dense_resets_at_chunk_64_keep_float32_precision():
    """A quarter of the gates resets and another quarter huge, chunk 64: about 30 per chunk and slot.
    Strict: passing means the limit is gone, and this marker with it."""
    q, k, v, s, _, hk0, hv0 = make_inputs(1, 128, 1, 16, 16, 16, torch.float32, "model", 9, True)
    g = _mixed_gates((1, 128, 1, 16), 9, 0.25, 0.25, 0.0).float()
    ours, ref = run_both(q, k, v, s, g, hk0, hv0, chunk_size=64)
    ref.pop("fp32_baseline", None)
    assert_close(ours, ref, torch.float32, "dense resets")


@pytest.mark.parametrize("op", ["chunk", "fused_recurrent"])
def test_positive_gates_are_refused_under_validation(monkeypatch, op):
    """g > 0 is outside GSA's domain (a decay above 1): with GSA_KERNELS_VALIDATE=1 a ValueError names g
    and where; without the flag no data is read (no device sync on the fast path)."""
    from gsa_kernels import fused_recurrent_gsa
    fn = chunk_gsa if op == "chunk" else fused_recurrent_gsa
    q, k, v, s, g, _, _ = make_inputs(1, 20, 1, 16, 16, 16, torch.float32, "model", seed=2, initial_state=False)
    g[0, 7, 0, 3] = 0.05
    dev = [x.to(DEVICE) for x in (q, k, v, s, g)]
    monkeypatch.setenv("GSA_KERNELS_VALIDATE", "1")
    with pytest.raises(ValueError, match=r"^g \(shape .*1 values > 0.*index \[0, 7, 0, 3\]"):
        fn(*dev)
    monkeypatch.setenv("GSA_KERNELS_VALIDATE", "0")
    fn(*dev)
