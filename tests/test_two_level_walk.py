"""The two-level state walk (launchers/chunk.py `Segments`, kernels/fold.py): segments of a sequence
walked in parallel from zero, folded in order, walked again from their true starts. It must give the
one-level walk's states (forward) and state gradients (backward) to float32 rounding, in every
layout: paired and split tiles, varlen with segments that end mid-sequence and sequences shorter than
a segment, initial and final states, compact (scaled float16) states, gates mixing 0 with very
negative values; and the whole op must meet the contract with segments forced.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, ON_GPU
from gsa_kernels import chunk_gsa, configs, launches
from gsa_kernels.launchers import chunk as launchers
from test_chunk import assert_close, make_inputs, run_both

WALKS = ("states_fwd", "states_fwd_compact", "states_bwd")


def walk_configs(segment, split=0, K=16, V=24, M=8, BT=16):
    """Every state walk at its default config with SEGMENT = segment and SPLIT = split."""
    return {kernel: dict(configs.default_config(kernel, K, V, M, BT, seqs=2), SEGMENT=segment, SPLIT=split)
            for kernel in WALKS}


def _inputs(dtype, varlen, gates="mixed", T=70):
    B = 1 if varlen else 2
    ins = make_inputs(B, T, 2, 16, 24, 8, dtype, gates=gates, seed=3)
    # sequences of 5 (shorter than a segment), 16, 16 and 33 tokens: segments end mid-sequence
    cu = torch.tensor([0, 5, 21, 37, T], dtype=torch.int32) if varlen else None
    if varlen:   # one initial state per sequence
        gen = torch.Generator().manual_seed(4)
        ins = ins[:5] + (torch.randn(4, 2, 16, 8, generator=gen), torch.randn(4, 2, 8, 24, generator=gen))
    return [x.to(DEVICE) for x in ins], cu


def _walks(ins, cu, compact=False):
    """The forward walk's outputs and the backward walk's, both memories, at the launch configs in force."""
    q, k, v, s, g, hk0, hv0 = ins
    B, T, H, _ = q.shape
    layout = launchers.ChunkLayout(B, T, 16, None if cu is None else cu.to(DEVICE), q.device)
    G = launchers.chunk_gates(g, layout)
    stored = launchers.COMPACT_STATES if compact else launchers.FLOAT32_STATES
    fwd = launchers.chunk_states_fwd(k, v, s, G, hk0, hv0, layout, output_final_state=True, compact=stored)
    gen = torch.Generator().manual_seed(9)
    do, dz, p = (torch.randn(t.shape, generator=gen).to(DEVICE, t.dtype) for t in (v, s.float(), s.float()))
    dht = [torch.randn(x.shape, generator=gen).to(DEVICE) for x in (hk0, hv0)]
    dh0 = [torch.empty_like(x) for x in (hk0, hv0)]
    bwd = launchers.chunk_states_bwd(q, do, dz, p, G, *dht, *dh0, layout, compact=compact)
    outs = [x for x in fwd + bwd + tuple(dh0) if x is not None]
    if layout.is_varlen:     # the backward leaves the unused chunk slots (padding of the bound) unset
        used = layout.table[:, 0] >= 0
        outs = [x[used] if x.shape[0] == layout.num_slots else x for x in outs]
    return outs


def _close(got, want, tol):
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = a.float(), b.float()
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err <= tol, f"output {i}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("split", [0, 1])
@pytest.mark.parametrize("segment", [2, 3] if ON_GPU else [2])
def test_segments_give_the_one_level_states(varlen, split, segment, monkeypatch):
    ins, cu = _inputs(torch.float32, varlen)
    folds = []
    real = launchers.fold_segments_kernel

    class Spy:
        def __getitem__(self, grid):
            folds.append(grid)
            return real[grid]

    monkeypatch.setattr(launchers, "fold_segments_kernel", Spy())
    with launches.override(walk_configs(1, split)):
        one_level = _walks(ins, cu)
    assert not folds
    with launches.override(walk_configs(segment, split)):
        two_level = _walks(ins, cu)
    assert len(folds) == 2, "the forward and the backward walk each fold once"
    _close(two_level, one_level, 1e-6)


@pytest.mark.parametrize("gates", ["steep", "mixed"])
def test_compact_segments_and_steep_gates(gates):
    """Compact states (one scale per row) and gates whose segment decays underflow to 0."""
    ins, cu = _inputs(torch.float16, False, gates=gates)
    with launches.override(walk_configs(1)):
        one_level = _walks(ins, cu, compact=True)
    with launches.override(walk_configs(2)):
        two_level = _walks(ins, cu, compact=True)
    _close(two_level, one_level, 2e-3)   # float16 chunk states: an ulp where the two walks round apart


@pytest.mark.parametrize("dtype,varlen", [(torch.float32, False), (torch.float16, True)]
                         + ([(torch.float32, True), (torch.float16, False)] if ON_GPU else []), ids=str)
def test_whole_op_with_segments_meets_the_contract(dtype, varlen):
    ins, cu = _inputs(dtype, varlen)
    with launches.override(walk_configs(2)):
        ours, ref = run_both(*[x.cpu() for x in ins], scale=0.5, cu_seqlens=cu, chunk_size=16)
    assert_close(ours, ref, dtype, "two-level walks")


def test_the_rule_picks_two_levels_for_one_long_sequence():
    """One sequence-head of 34 chunks leaves almost every SM idle: SEGMENT 0 resolves to segments of
    16 chunks with paired tiles, the launch record says so, and the states and output are the one-level
    walk's (a forward: the backward's two-level walk is the forced-segment tests' subject)."""
    ins = [x.to(DEVICE) for x in make_inputs(1, 544, 1, 16, 16, 8, torch.float32, seed=5)]

    def run():
        with torch.no_grad():
            o, (hk, hv) = chunk_gsa(*ins[:5], initial_state=tuple(ins[5:]), output_final_state=True, chunk_size=16)
        return [o, hk, hv]

    two_levels = run()
    cfg = launches.last_launches()["states_fwd"]["config"]
    assert cfg["SEGMENT"] == 16 and cfg["SPLIT"] == 0, cfg
    with launches.override(walk_configs(1, 0, K=16, V=16, M=8)):
        one_level = run()
    _close(two_levels, one_level, 1e-5)


def test_segment_rule():
    sms = configs.num_sms()
    assert configs.walk_segment_chunks(0, sms // 2 + 1, 1024) == 0     # most SMs have a program
    assert configs.walk_segment_chunks(0, 64, 1024) == max(16, -(-1024 // max(2, 2 * sms // 64)))
    assert configs.walk_segment_chunks(0, 64, 20) == 0                 # segments of 16 cover it
    assert configs.walk_segment_chunks(1, 8, 1024) == 0                # 1: one level
    assert configs.walk_segment_chunks(32, 8, 1024) == 32
    assert configs.walk_segment_chunks(64, 8, 64) == 0                 # no longer than a sequence
