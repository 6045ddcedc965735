"""chunk_gsa's checkpoint_level: what a training call keeps for its backward, and that keeping less
changes nothing else.

Level 0 (and 1: the gate cumsum is never kept) saves the chunk states (for half inputs Hv as scaled
float16); level 2 (the default, as flash-linear-attention's) saves the inputs, the float32 slot
scores and the float32 chunk states at the start of every segment of L chunks only (or none, where
the walk fills the GPU), and the backward walks every segment again from its start (or every
sequence from its own).
For float32 inputs the rebuilt states are the forward's bit for bit (each step the forward walk's,
from the forward's own state), so both levels give the same gradients exactly, eager and through
the custom ops, with one segment per sequence or several (`_segments`: L = 2 chunks). For half
inputs every level's forward stores Hv's chunk states as scaled float16 (and level 2 rebuilds both
that way), which the tf32 dots read without loss, and Hk's as float32: the forward is the same at
every level, and each level meets the contract.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, ON_GPU
from gsa_kernels import chunk_gsa, configs, ops
from gsa_kernels.launchers.chunk import num_chunk_slots
from gsa_kernels.layers import GatedSlotAttention
from test_chunk import HALF, assert_close, make_inputs, run_both



def _grads_at(level, ins, cu_seqlens=None, chunk_size=16, compiled_ops=False):
    """(o, hk, hv) and the gradients of every input (with initial states) at a checkpoint level."""
    xs = [x.detach().clone().to(DEVICE).requires_grad_() for x in ins]
    cu = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
    if compiled_ops:    # the custom ops that torch.compile runs, called eagerly
        o, hk, hv = ops.chunk_gsa_compiled(*xs, cu, 0.5, chunk_size, True, level)
    else:
        o, (hk, hv) = chunk_gsa(*xs[:5], scale=0.5, initial_state=(xs[5], xs[6]), output_final_state=True,
                                checkpoint_level=level, cu_seqlens=cu, chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(7)
    ups = [torch.randn(t.shape, generator=gen).to(device=DEVICE, dtype=t.dtype) for t in (o, hk, hv)]
    torch.autograd.backward([o, hk, hv], ups)
    return [o.detach(), hk.detach(), hv.detach()] + [x.grad for x in xs]


def _segments(which, monkeypatch):
    """Level 2's rebuilt walk with one segment per sequence ("one": the default's 1024 tokens), or
    ("several") segments of two chunks: at chunk 16, T = 37 walks 2 segments, the varlen inputs' long
    sequence 2; or ("none") as where the walk fills the GPU: no starts kept, every sequence walked
    again from its start."""
    if which == "several":
        monkeypatch.setattr(configs, "RECOMPUTE_SEGMENT_TOKENS", 32)
    if which == "none":
        monkeypatch.setattr(configs, "num_sms", lambda: 1)


def _level_inputs(dtype, varlen):
    B = 1 if varlen else 2
    ins = make_inputs(B, 37, 2, 16, 24, 8, dtype, gates="mixed", seed=3)
    cu = torch.tensor([0, 2, 3, 37], dtype=torch.int32) if varlen else None   # 1, 1 and 3 chunks at 16
    if varlen:   # one initial state per sequence
        gen = torch.Generator().manual_seed(4)
        ins = ins[:5] + (torch.randn(3, 2, 16, 8, generator=gen), torch.randn(3, 2, 8, 24, generator=gen))
    return ins, cu


NAMES = ["o", "hk", "hv", "dq", "dk", "dv", "ds", "dg", "dhk0", "dhv0"]


# every segment form, and packed sequences with one segment and with several (CI's time: not all six)
@pytest.mark.parametrize("varlen,segments", [(False, "none"), (True, "one"), (False, "several"), (True, "several")])
def test_float32_levels_give_the_same_results_bit_for_bit(varlen, segments, monkeypatch):
    _segments(segments, monkeypatch)
    ins, cu = _level_inputs(torch.float32, varlen)
    level0, level2 = (_grads_at(level, ins, cu) for level in (0, 2))
    for name, a, b in zip(NAMES, level0, level2):
        assert torch.equal(a, b), f"level 2 differs from level 0 in {name}"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("varlen", [False, True])
def test_half_levels_share_the_forward_and_meet_the_contract(dtype, varlen, monkeypatch):
    _segments("several", monkeypatch)     # one segment is every level-2 call of test_chunk.py
    ins, cu = _level_inputs(dtype, varlen)
    runs = {level: run_both(*ins, scale=0.5, cu_seqlens=cu, chunk_size=16, checkpoint_level=level)
            for level in (0, 2)}
    # one forward walk at both levels (Hk float32, Hv scaled float16): the same o and final states
    for name in ("o", "hk", "hv"):
        assert torch.equal(runs[0][0][name], runs[2][0][name]), f"level 2 changes the forward's {name}"
    # the gradients: level 0's from the forward's 16-bit Hv, level 2's from float32 starts rebuilt
    for level, (ours, ref) in runs.items():
        assert_close(ours, ref, dtype, f"checkpoint_level={level}")


@pytest.mark.parametrize("level,segments", [(0, "one"), (2, "none"), (2, "one"), (2, "several")])
def test_custom_ops_match_the_eager_path_at_each_level(level, segments, monkeypatch):
    _segments(segments, monkeypatch)
    ins = make_inputs(2, 29, 2, 16, 16, 8, torch.float32, gates="model", seed=5)
    eager = _grads_at(level, ins)
    compiled = _grads_at(level, ins, compiled_ops=True)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@pytest.mark.parametrize("level", [0, 2])
def test_each_level_matches_the_float64_recurrence(level):
    q, k, v, s, g, hk0, hv0 = make_inputs(2, 45, 2, 16, 16, 12, torch.float32, gates="steep", seed=11)
    ours, ref = run_both(q, k, v, s, g, hk0, hv0, chunk_size=16, checkpoint_level=level)
    assert_close(ours, ref, torch.float32, f"checkpoint_level={level}")


def _saved_bytes(level, B, T, H, K, V, M, chunk_size, dtype=torch.float32):
    """Bytes the forward of one training call keeps for its backward (autograd's saved tensors)."""
    ins = make_inputs(B, T, H, K, V, M, dtype, seed=1)
    xs = [x.to(DEVICE).requires_grad_() for x in ins]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, _ = chunk_gsa(*xs[:5], initial_state=(xs[5], xs[6]), checkpoint_level=level, chunk_size=chunk_size)
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in saved if t.numel()}
    return sum(unique.values()), o


@pytest.mark.parametrize("segments", ["none", "one", "several"])
def test_level_2_keeps_the_segment_starts_only_and_level_1_is_level_0(segments, monkeypatch):
    _segments(segments, monkeypatch)
    B, T, H, K, V, M, BT = 2, 40, 2, 16, 24, 8, 16
    inputs = 4 * (B * T * H * (2 * K + V + 2 * M) + B * H * (K * M + M * V))   # float32 q k v s g hk0 hv0
    scores = 4 * B * T * H * M
    states = 4 * num_chunk_slots(B, T, BT, B, False) * H * (K * M + M * V)
    L = configs.recompute_segment_chunks(BT, B * H, K, V)
    starts = 4 * num_chunk_slots(B, T, BT * L, B, False) * H * (K * M + M * V) if L else 0
    assert starts == {"none": 0, "one": states // 3, "several": 2 * states // 3}[segments]   # 3 chunks a sequence
    level2, _ = _saved_bytes(2, B, T, H, K, V, M, BT)
    level1, _ = _saved_bytes(1, B, T, H, K, V, M, BT)
    level0, _ = _saved_bytes(0, B, T, H, K, V, M, BT)
    assert level2 == inputs + scores + starts
    assert level0 == level1 == inputs + scores + states     # 1 is 0: the gate cumsum is never kept
    # half inputs: level 0 keeps Hk's float32 chunk states and Hv's as float16 with a float32 scale
    # per column; level 2's starts stay float32
    half_inputs = 2 * B * T * H * (2 * K + V + 2 * M) + 4 * B * H * (K * M + M * V)
    slots = num_chunk_slots(B, T, BT, B, False)
    half_states = slots * H * (4 * K * M + 2 * M * V + 4 * V)
    assert _saved_bytes(0, B, T, H, K, V, M, BT, torch.float16)[0] == half_inputs + scores + half_states
    assert _saved_bytes(2, B, T, H, K, V, M, BT, torch.float16)[0] == half_inputs + scores + starts


def test_positional_order_is_flash_linear_attentions():
    """fla.ops.gsa.chunk_gsa(q, k, v, s, g, scale, initial_state, output_final_state,
    checkpoint_level, cu_seqlens): the same positions work here."""
    q, k, v, s, g, _, _ = make_inputs(1, 20, 1, 8, 8, 4, torch.float32, seed=2)
    xs = [x.to(DEVICE) for x in (q, k, v, s, g)]
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEVICE)
    o_pos, (hk_pos, _) = chunk_gsa(*xs, None, None, True, 0, cu)
    o_kw, (hk_kw, _) = chunk_gsa(*xs, output_final_state=True, checkpoint_level=0, cu_seqlens=cu)
    assert torch.equal(o_pos, o_kw) and hk_pos.shape[0] == 2 and torch.equal(hk_pos, hk_kw)


@pytest.mark.parametrize("bad", [3, -1, 1.5, True, "2", None])
def test_bad_levels_are_refused_by_name(bad):
    q, k, v, s, g, _, _ = make_inputs(1, 8, 1, 8, 8, 4, torch.float32, seed=2)
    with pytest.raises(ValueError, match="checkpoint_level"):
        chunk_gsa(*(x.to(DEVICE) for x in (q, k, v, s, g)), checkpoint_level=bad)
    with pytest.raises(ValueError, match="checkpoint_level"):
        GatedSlotAttention(hidden_size=32, num_heads=2, num_slots=4, checkpoint_level=bad)


@pytest.mark.skipif(not ON_GPU, reason="peak memory of the CUDA caching allocator")
def test_level_2_lowers_what_lives_between_forward_and_backward():
    B, T, H, D, M = 2, 2048, 4, 128, 64
    held = {}
    for level in (0, 2):
        ins = [x.to("cuda", torch.bfloat16).requires_grad_() for x in make_inputs(B, T, H, D, D, M,
                                                                                   torch.float32, seed=1)[:5]]
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        o, _ = chunk_gsa(*ins, checkpoint_level=level)
        torch.cuda.synchronize()
        held[level] = torch.cuda.memory_allocated() - before
        o.sum().backward()
        del o, ins
    states = B * (T // 16) * H * D * M * (4 + 2)    # float32 Hk and float16 Hv at the smallest chunk
    assert held[0] - held[2] >= states // 4, held   # at least the states of the largest chunk (64)


@pytest.mark.skipif(not ON_GPU, reason="peak memory of the CUDA caching allocator")
def test_level_2_backward_peak_holds_three_compact_state_tensors_at_most():
    """The level-2 backward's own peak (beyond what lives before it) is the input gradients, the float32
    per-slot temporaries and at most three of the four state-sized tensors (hk, hv, dhk, dhv) as scaled
    float16: the keys' side is freed before the values' reverse walk (launchers/chunk.py)."""
    B, T, H, D, M, BT = 1, 4096, 2, 512, 64, 32
    q, k, v, s, g = (x.to("cuda", torch.bfloat16).requires_grad_()
                     for x in make_inputs(B, T, H, D, D, M, torch.float32, seed=1)[:5])
    o, _ = chunk_gsa(q, k, v, s, g, checkpoint_level=2, chunk_size=BT)
    do = torch.randn_like(o)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    o.backward(do)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    tokens, slots = B * T * H, B * (T // BT) * H
    one_state = slots * (D * M * 2 + D * 4)             # float16 values + float32 scales, one memory
    grads = tokens * (3 * D + 2 * M) * 2                # dq, dk, dv, ds, dg (bfloat16)
    temporaries = 5 * tokens * M * 4 + 2 * slots * M * 4  # G, p, dz, dG_loc, ds_keys; the carry
    budget = 3 * one_state + grads + temporaries
    assert peak <= budget * 1.05, f"backward peak {peak / 2**20:.1f} MiB, budget {budget / 2**20:.1f} MiB"
    assert peak >= 0.5 * budget, "the case no longer measures the state tensors"
