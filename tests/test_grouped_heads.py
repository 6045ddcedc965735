"""Grouped query heads (FLA 0.6.0's GQA): q with HQ heads, k, v, s, g and the states with H = HQ / group.
Both ops against the float64 recurrence (whose grouped form is its definition: each kv head's memory
read by its group), forward, final states and every gradient, group sizes 1, 2, 4, dense and packed,
gates and ABC mode.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, ON_GPU
from gsa_kernels import chunk_gsa, configs, fused_recurrent_gsa, launches
from gsa_kernels.launchers import chunk as chunk_launchers
from test_abc_mode import _inputs, run_op_and_naive
from test_chunk import DTYPES, assert_close

OPS = {"chunk": chunk_gsa, "recurrent": fused_recurrent_gsa}


def _grouped(group, T, dtype, gates, N=1, seed=0):
    """q with 2 * group heads, the rest with 2 heads (initial states per kv head)."""
    q, *_ = _inputs(T, H=2 * group, dtype=dtype, seed=seed + 1, gates=gates, N=N)
    _, k, v, s, g, hk0, hv0 = _inputs(T, H=2, dtype=dtype, seed=seed, gates=gates, N=N)
    return q, k, v, s, g, hk0, hv0


# every combination on the GPU; in the interpreter (CI's time) a cover of each value
CASES = [(op, dt, group, gates) for op in OPS for dt in DTYPES for group in (1, 2, 4) for gates in ("model", "abc")]
if not ON_GPU:
    CASES = [("chunk", torch.float32, 2, "model"), ("chunk", torch.float16, 4, "abc"),
             ("recurrent", torch.float32, 4, "abc"), ("recurrent", torch.float16, 2, "model"),
             ("chunk", torch.float32, 1, "abc")]


@pytest.mark.parametrize("op_name,dtype,group,gates", CASES, ids=str)
def test_grouped_heads_match_naive(op_name, dtype, group, gates):
    q, k, v, s, g, hk0, hv0 = _grouped(group, 21, dtype, gates)
    kw = {"chunk_size": 16} if op_name == "chunk" else {}
    ours, ref, _ = run_op_and_naive(OPS[op_name], q, k, v, s, g, hk0, hv0, **kw)
    assert ours["hk"].shape[1] == 2 and ours["dk"].shape[2] == 2
    assert_close(ours, ref, dtype, f"GQA {op_name} group {group} {gates}")


@pytest.mark.parametrize("op_name", list(OPS))
def test_grouped_heads_varlen(op_name):
    lengths = [5, 0, 12]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v, s, g, hk0, hv0 = _grouped(2, sum(lengths), torch.float32, "model", N=len(lengths), seed=3)
    kw = {"chunk_size": 16} if op_name == "chunk" else {}
    ours, ref, _ = run_op_and_naive(OPS[op_name], q, k, v, s, g, hk0, hv0, cu_seqlens=cu, **kw)
    assert_close(ours, ref, torch.float32, f"GQA varlen {op_name}")


def _walks_at(segment, split, K=16, V=8, M=16):
    """The state walks at their defaults with SEGMENT = segment (2: two levels) and SPLIT = split."""
    return {w: dict(configs.default_config(w, K, V, M, 16, seqs=2), SEGMENT=segment, SPLIT=split)
            for w in ("states_fwd", "states_fwd_compact", "states_bwd")}


# (dtype, group, checkpoint level, SEGMENT, SPLIT): the walks over the group's stacked rows in every
# form, both sides of the level-2 backward; a cover in the interpreter, every combination on the GPU
WALK_CASES = [(dt, group, level, seg, split) for dt in DTYPES for group in (2, 4) for level in (0, 2)
              for seg in (1, 2) for split in (0, 1)]
if not ON_GPU:
    WALK_CASES = [(torch.float32, 4, 0, 2, 1), (torch.float16, 2, 2, 2, 0), (torch.float32, 2, 2, 1, 1)]


class _Grids:
    """A kernel whose launch grids are recorded."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("dtype,group,level,segment,split", WALK_CASES, ids=str)
def test_grouped_heads_walk_per_kv_head(dtype, group, level, segment, split, monkeypatch):
    """The chunk op walks one memory per kv head (walk rows N * H * segments, never N * HQ: no repeated
    kv heads), its chunk kernels run per query head, and it meets the contract at both checkpoint
    levels, one- and two-level walks, paired and split tiles."""
    spies = {name: _Grids(getattr(chunk_launchers, name))
             for name in ("states_fwd_kernel", "states_bwd_kernel", "chunk_fwd_kernel", "chunk_bwd_keys_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(chunk_launchers, name, spy)
    q, k, v, s, g, hk0, hv0 = _grouped(group, 45, dtype, "model", seed=5)
    with launches.override(_walks_at(segment, split)):
        ours, ref, _ = run_op_and_naive(chunk_gsa, q, k, v, s, g, hk0, hv0, chunk_size=16, checkpoint_level=level)
    assert_close(ours, ref, dtype, f"GQA walks group {group} level {level} segment {segment} split {split}")
    walk_rows = 2 * (-(-45 // (16 * segment)) if segment > 1 else 1)     # 2 kv heads x segments
    # level 2's backward rebuilds the states from the segment starts the forward kept
    L = configs.recompute_segment_chunks(16, 2, k.shape[-1], v.shape[-1])
    rebuilt_rows = 2 * -(-45 // (16 * L)) if L else walk_rows
    expected = {"states_fwd_kernel": {walk_rows} | ({rebuilt_rows} if level == 2 else set()),
                "states_bwd_kernel": {walk_rows}}
    for name, rows in expected.items():
        assert {grid[1] for grid in spies[name].grids} == rows, (name, spies[name].grids)
    for name in ("chunk_fwd_kernel", "chunk_bwd_keys_kernel"):
        assert {grid[1] for grid in spies[name].grids} == {2 * group}, (name, spies[name].grids)


def test_group_sizes_cap_the_chunk_size_or_repeat_the_kv_heads(monkeypatch):
    """The reverse walk's stacked rows (chunk x group, times the slots) must fit: a large group runs
    at a smaller chunk size, and one too large for any runs as FLA runs it (kv heads repeated, the
    walks over every query head), both within the contract."""
    assert chunk_launchers.stacked_chunk_limit(1, 64) == 64
    assert chunk_launchers.stacked_chunk_limit(4, 64) == 64
    assert chunk_launchers.stacked_chunk_limit(8, 64) == 32
    assert chunk_launchers.stacked_chunk_limit(3, 128) == 32
    assert chunk_launchers.stacked_chunk_limit(16, 128) == 0
    spy, chunks = _Grids(chunk_launchers.states_fwd_kernel), _Grids(chunk_launchers.chunk_fwd_kernel)
    monkeypatch.setattr(chunk_launchers, "states_fwd_kernel", spy)
    monkeypatch.setattr(chunk_launchers, "chunk_fwd_kernel", chunks)
    q, k, v, s, g, hk0, hv0 = _grouped(8, 33, torch.float32, "model", seed=7)    # 16 query heads, 2 kv
    with monkeypatch.context() as m:
        m.setattr(chunk_launchers, "STACKED_ELEMENTS", 16 * 16 * 4)      # no chunk size fits group 8
        ours, ref, _ = run_op_and_naive(chunk_gsa, q, k, v, s, g, hk0, hv0, chunk_size=64)
    assert_close(ours, ref, torch.float32, "GQA group 8, kv heads repeated")
    assert {grid[1] for grid in spy.grids} == {16}, spy.grids       # walked per query head
    spy.grids.clear()
    with monkeypatch.context() as m:
        m.setattr(chunk_launchers, "STACKED_ELEMENTS", 16 * 8 * 16)      # group 8 fits at chunk 16 only
        ours, ref, _ = run_op_and_naive(chunk_gsa, q, k, v, s, g, hk0, hv0, chunk_size=64)
    assert_close(ours, ref, torch.float32, "GQA group 8 at chunk 16")
    assert {grid[1] for grid in spy.grids} == {2}, spy.grids        # walked per kv head
    assert chunks.grids[-1] == (3, 16), chunks.grids                # 33 tokens in chunks of 16


def test_heads_that_do_not_group_are_refused():
    q, k, v, s, g, _, _ = _grouped(1, 4, torch.float32, "model")
    q3 = torch.cat([q, q[:, :, :1]], 2)            # 3 query heads over 2 kv heads
    for op in OPS.values():
        with pytest.raises(ValueError, match="multiple"):
            op(*(x.to(DEVICE) for x in (q3, k, v, s, g)))


_SM90_COMPILE = """
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gsa_kernels.launchers.chunk import states_bwd_kernel as fn
const, pointer, options = json.loads(sys.argv[1])
params = list(inspect.signature(fn.fn).parameters)
signature = {p: "constexpr" if p in const else pointer.get(p, "*fp32") for p in params}
aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p not in const}
kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=const, attrs=aligned),
                        target=GPUTarget("cuda", 90, 32), options=options)
print(kernel.metadata.shared)
"""


def test_the_stacked_reverse_walk_fits_sm90_shared_memory():
    """Triton's interpreter has no shared memory, and the stacked reverse walk's grows with chunk x
    group x slots (a group padded to 16 rows once needed 589824 bytes and failed every launch on the
    H200). Compiled for sm90 (no GPU needed; in a process without TRITON_INTERPRET, which would give
    interpreted functions) at the largest stacking the launcher allows, group 8 at chunk 32 with
    M = 64 and the default config, both memories, half inputs: within an H200's."""
    import json
    import os
    import subprocess
    import sys

    from gsa_kernels.resources import SMEM_BYTES
    group, BT, M = 8, 32, 64
    assert chunk_launchers.stacked_chunk_limit(group, M) == BT
    GP, cfg = chunk_launchers.stacked_walk(configs.default_config("states_bwd", 512, 512, M, BT, seqs=32),
                                           BT, group, M)
    assert GP == group       # the stacked rows: the group's power of two, no more
    const = dict(T=2048, segment_chunks=1, H=4, K=512, V=512, M=M, BT=BT, BM=M, BK=cfg["BK"], BV=cfg["BV"],
                 SPLIT=cfg["SPLIT"], DO_KEYS=True, DO_VALUES=True, SEGMENTED=False, USE_FINAL_STATE_GRADIENT=True,
                 STORE_CHUNKS=True, STORE_INITIAL=True, STORE_DECAY=False, IS_VARLEN=False, PREC="tf32",
                 COMPACT=True, GROUP=group, GP=GP)
    pointer = {"q": "*bf16", "do": "*bf16", "dhk_chunks": "*fp16", "dhv_chunks": "*fp16", "cu_seqlens": "*i32",
               "chunk_offsets": "*i32", "segment_table": "*i32"}
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _SM90_COMPILE, json.dumps([const, pointer, options])], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    shared = int(run.stdout.split()[-1])
    assert 0 < shared <= SMEM_BYTES["sm90"], shared
