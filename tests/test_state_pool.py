"""State pools (gsa_kernels/state_pool.py): the decode step, fused_recurrent_gsa and chunk_gsa read and
write a serving engine's per-layer pools by slot. Each call is checked against per-request calls on
the rows' own states: out-of-order slots, a padding row (-1: o = 0, nothing written), a slot reused by
a new request (has_initial_state False), untouched slots left as they were.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE
from gsa_kernels import chunk_gsa, fused_recurrent_gsa
from test_chunk import make_inputs

H, K, V, M, S = 2, 16, 8, 8, 5
INDICES = [3, -1, 0, 2]
HAS_STATE = [True, True, False, True]


def _pools(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(S, H, K, M, generator=gen).to(DEVICE), torch.randn(S, H, M, V, generator=gen).to(DEVICE))


def _per_request(op, xs, pools, n, rows, cu=None, **kw):
    """(o of request n, its new (hk, hv)) from a call on its own state (its slot's, or zeros)."""
    slot, has = INDICES[n], HAS_STATE[n]
    h0 = tuple(p[slot:slot + 1].clone() if has else torch.zeros_like(p[:1]) for p in pools)
    if cu is None:
        ins = [x[n:n + 1] for x in xs]
    else:
        ins = [x[:, cu[n]:cu[n + 1]] for x in xs]
        if cu[n] == cu[n + 1]:           # an empty sequence keeps its state
            return xs[2][:, :0], h0
    return op(*ins, initial_state=h0, output_final_state=True, **kw)


@pytest.mark.parametrize("case", ["decode", "recurrent", "recurrent-varlen", "chunk-varlen"])
def test_pools_match_per_request_calls(case):
    varlen = case.endswith("varlen")
    T = 1 if case == "decode" else 9
    lengths = [3, 2, 0, 6]
    if varlen:
        xs = [x.to(DEVICE) for x in make_inputs(1, sum(lengths), H, K, V, M, torch.float32, seed=1)[:5]]
        cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
    else:
        xs = [x.to(DEVICE) for x in make_inputs(4, T, H, K, V, M, torch.float32, seed=1)[:5]]
        cu = None
    op = chunk_gsa if case.startswith("chunk") else fused_recurrent_gsa
    kw = {"chunk_size": 16} if op is chunk_gsa else {}
    pools = _pools()
    before = tuple(p.clone() for p in pools)
    idx = torch.tensor(INDICES, dtype=torch.int32, device=DEVICE)
    has = torch.tensor(HAS_STATE, device=DEVICE)
    cu_dev = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    extra = {"inplace": True} if op is fused_recurrent_gsa else {}
    with torch.no_grad():
        o, returned = op(*xs, initial_state=pools, cu_seqlens=cu_dev, state_indices=idx, has_initial_state=has,
                         **extra, **kw)
        assert returned[0] is pools[0] and returned[1] is pools[1]
        for n in range(4):
            rows = slice(n, n + 1) if cu is None else slice(cu[n], cu[n + 1])
            got = o[n:n + 1] if cu is None else o[:, rows]
            if INDICES[n] < 0:
                assert not got.any(), "a padding row's output is 0"
                continue
            ro, (rhk, rhv) = _per_request(op, xs, before, n, rows, None if cu is None else cu, **kw)
            torch.testing.assert_close(got, ro, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pools[0][INDICES[n]], rhk[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pools[1][INDICES[n]], rhv[0], rtol=1e-5, atol=1e-5)
    for slot in set(range(S)) - {i for i in INDICES if i >= 0}:      # slots no row names: untouched
        assert torch.equal(pools[0][slot], before[0][slot]) and torch.equal(pools[1][slot], before[1][slot])


def test_only_padding_rows_write_nothing():
    xs = [x.to(DEVICE) for x in make_inputs(2, 1, H, K, V, M, torch.float32, seed=2)[:5]]
    pools = _pools(3)
    before = tuple(p.clone() for p in pools)
    with torch.no_grad():
        o, _ = fused_recurrent_gsa(*xs, initial_state=pools, state_indices=torch.tensor([-1, -1], device=DEVICE),
                                   inplace=True)
        o2, _ = chunk_gsa(*[x.expand(2, 20, *x.shape[2:]).contiguous() for x in xs], initial_state=pools,
                          state_indices=torch.tensor([-1, -1], device=DEVICE), chunk_size=16)
    assert not o.any() and not o2.any()
    assert torch.equal(pools[0], before[0]) and torch.equal(pools[1], before[1])


@pytest.mark.parametrize("bad,match", [
    ({"state_indices": torch.tensor([0, 5])}, r"\[0, 5\]"),           # on the CPU: checked for free
    ({"state_indices": torch.tensor([0, -2])}, r"\[-2, 0\]"),
    ({"state_indices": torch.tensor([0.0, 1.0])}, "integer"),
    ({"state_indices": torch.tensor([0, 1]), "inplace": False}, "inplace=True"),
    ({"has_initial_state": torch.tensor([True, False])}, "goes with state_indices"),
], ids=["too-large", "below-minus-one", "float", "not-inplace", "flags-alone"])
def test_bad_pool_arguments(bad, match):
    xs = [x.to(DEVICE) for x in make_inputs(2, 1, H, K, V, M, torch.float32, seed=2)[:5]]
    kw = {"inplace": True, **bad}
    with torch.no_grad(), pytest.raises((ValueError, TypeError), match=match):
        fused_recurrent_gsa(*xs, initial_state=_pools(), **kw)


def test_pools_refuse_gradients_and_wrong_pools():
    xs = [x.to(DEVICE).requires_grad_() for x in make_inputs(2, 1, H, K, V, M, torch.float32, seed=2)[:5]]
    idx = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="inference"):
        fused_recurrent_gsa(*xs, initial_state=_pools(), state_indices=idx, inplace=True)
    with torch.no_grad(), pytest.raises(ValueError, match="hk_pool"):
        fused_recurrent_gsa(*xs, initial_state=(_pools()[0].half(), _pools()[1]), state_indices=idx, inplace=True)


def test_continuous_batching_example_serves_each_request_as_alone():
    """examples/continuous_batching.py: 6 requests through 4 slots (reused after a request finishes)
    and a decode batch of 3 rows (padding rows once fewer run): every output a request was served
    equals one call on its whole sequence from zeros."""
    from examples import continuous_batching
    requests = [continuous_batching.Request(rid, prompt=3 + 5 * rid % 7, new=2 + rid % 4) for rid in range(6)]
    finished, steps = continuous_batching.serve(requests, slots=4, batch=3, device=DEVICE)
    assert sorted(r.rid for r in finished) == list(range(6)) and steps >= 6
    assert all(sum(o.shape[1] for o in r.outputs) == r.prompt + r.new for r in finished)
    assert continuous_batching.check(finished, DEVICE) <= 1e-5
