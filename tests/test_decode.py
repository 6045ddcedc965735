"""The decode step (fused_recurrent_gsa with T = 1, a state and no gradients): two launches that update
both memories and read the output, against the float64 naive recurrence; the caller's state is
never written unless asked (inplace=True / out=).
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, ON_GPU
from gsa_kernels import fused_recurrent_gsa, last_launches
from gsa_kernels.configs import decode_tile, decode_warps
from gsa_kernels.launchers.recurrent import decode_step
from reference import naive_recurrent_gsa
from test_chunk import BOUNDS, DTYPES, make_inputs, rel_err


def reference_step(q, k, v, s, g, hk0, hv0, scale=None):
    ins = [x.double().cpu() for x in (q, k, v, s, g)]
    h0 = None if hk0 is None else (hk0.double().cpu(), hv0.double().cpu())
    return naive_recurrent_gsa(*ins, scale=scale, initial_state=h0, output_final_state=True)


def check_step(o, hk, hv, ref, dtype):
    o_bound, bound = BOUNDS[dtype]
    ro, (rhk, rhv) = ref
    errors = {"o": rel_err(o, ro), "hk": rel_err(hk, rhk), "hv": rel_err(hv, rhv)}
    assert errors["o"] <= o_bound and errors["hk"] <= bound and errors["hv"] <= bound, errors
    return errors


SHAPES = [  # (B, H, K, V, M)
    (2, 2, 16, 24, 5),       # M not a power of two, V not a multiple of the tile
    (1, 1, 40, 72, 20),
    (3, 2, 16, 16, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,K,V,M", SHAPES, ids=[f"B{x[0]}-H{x[1]}-K{x[2]}-V{x[3]}-M{x[4]}" for x in SHAPES])
@pytest.mark.parametrize("h0", [True, False], ids=["state", "no-state"])
def test_decode_matches_naive(B, H, K, V, M, h0, dtype):
    q, k, v, s, g, hk0, hv0 = make_inputs(B, 1, H, K, V, M, dtype, "mixed", seed=B + K + M, initial_state=h0)
    dev = [x.to(DEVICE) for x in (q, k, v, s, g)]
    state = (hk0.to(DEVICE), hv0.to(DEVICE)) if h0 else None
    with torch.no_grad():
        o, (hk, hv) = fused_recurrent_gsa(*dev, initial_state=state, output_final_state=True)
    assert "decode" in last_launches()
    assert o.shape == (B, 1, H, V) and o.dtype == dtype and hk.dtype == hv.dtype == torch.float32
    check_step(o, hk, hv, reference_step(q, k, v, s, g, hk0, hv0), dtype)


def test_decode_tiles_fill_the_gpu_at_small_batch():
    # 132 SMs in the interpreter: 16-row tiles while 64-row ones would leave half the SMs without a
    # program, 32 up to eight per SM, then 64; a [tile, BM] float32 tile at most 8192 elements; never
    # wider than the (padded) dimension
    assert decode_tile(512, 64, NH=4) == 16
    assert decode_tile(512, 64, NH=32) == decode_tile(512, 64, NH=64) == 32
    assert decode_tile(512, 64, NH=256) == 64
    assert decode_tile(512, 256, NH=256) == 32
    assert decode_tile(16, 16, NH=1) == 16 and decode_tile(24, 5, NH=1) == 16
    assert decode_warps(64, 64, 64) == 1 and decode_warps(32, 32, 256) == 2


def test_decode_loop_equals_the_sequence():
    """T decode steps, each feeding its state to the next, equal the recurrence over the whole sequence."""
    B, T, H, K, V, M = 2, 6, 2, 16, 16, 10
    q, k, v, s, g, hk0, hv0 = make_inputs(B, T, H, K, V, M, torch.float32, "model", seed=3)
    state = (hk0.to(DEVICE), hv0.to(DEVICE))
    outs = []
    with torch.no_grad():
        for t in range(T):
            o, state = fused_recurrent_gsa(*(x[:, t:t + 1].to(DEVICE) for x in (q, k, v, s, g)),
                                           initial_state=state, output_final_state=True)
            outs.append(o)
    ref = reference_step(q, k, v, s, g, hk0, hv0)
    check_step(torch.cat(outs, 1), *state, ref, torch.float32)


def test_decode_leaves_the_callers_state_untouched():
    q, k, v, s, g, hk0, hv0 = make_inputs(2, 1, 2, 16, 16, 8, torch.float32, "model", seed=1)
    dev = [x.to(DEVICE) for x in (q, k, v, s, g)]
    hk0, hv0 = hk0.to(DEVICE), hv0.to(DEVICE)
    before = hk0.clone(), hv0.clone()
    with torch.no_grad():
        _, (hk, hv) = fused_recurrent_gsa(*dev, initial_state=(hk0, hv0), output_final_state=True)
        # beam search: two continuations from one state
        o2, _ = fused_recurrent_gsa(*dev, initial_state=(hk0, hv0), output_final_state=True)
    assert torch.equal(hk0, before[0]) and torch.equal(hv0, before[1])
    assert hk.data_ptr() != hk0.data_ptr() and hv.data_ptr() != hv0.data_ptr()
    assert not torch.equal(hk, hk0)


def test_decode_without_final_state():
    q, k, v, s, g, hk0, hv0 = make_inputs(1, 1, 2, 16, 16, 8, torch.float32, "model", seed=2)
    dev = [x.to(DEVICE) for x in (q, k, v, s, g)]
    with torch.no_grad():
        o, (hk, hv) = fused_recurrent_gsa(*dev, initial_state=(hk0.to(DEVICE), hv0.to(DEVICE)))
    assert hk is None and hv is None
    ro, _ = reference_step(q, k, v, s, g, hk0, hv0)
    assert rel_err(o, ro) <= 1e-5


@pytest.mark.parametrize("group", [1, 4])
def test_decode_inplace_and_out(group):
    """The new states into given buffers, or over the initial ones; with grouped heads, per kv head."""
    q, k, v, s, g, hk0, hv0 = grouped_step(2, group, 2, 48, 80, 12, seed=5)
    dev = [x.to(DEVICE) for x in (q, k, v, s, g)]
    ref = reference_step(q, k, v, s, g, hk0, hv0)
    hk0, hv0 = hk0.to(DEVICE), hv0.to(DEVICE)
    with torch.no_grad():
        bufs = torch.empty_like(hk0), torch.empty_like(hv0)
        o, (hk, hv) = fused_recurrent_gsa(*dev, initial_state=(hk0, hv0), out=bufs)
        assert hk is bufs[0] and hv is bufs[1]
        check_step(o, hk, hv, ref, torch.float32)
        o, (hk, hv) = fused_recurrent_gsa(*dev, initial_state=(hk0, hv0), inplace=True)
        assert hk is hk0 and hv is hv0
        check_step(o, hk0, hv0, ref, torch.float32)


def test_decode_with_gradients_takes_the_training_path():
    q, k, v, s, g, hk0, hv0 = make_inputs(1, 1, 1, 16, 16, 8, torch.float32, "model", seed=6)
    q_dev = q.detach().clone().to(DEVICE).requires_grad_()
    o, (hk, hv) = fused_recurrent_gsa(q_dev, *(x.to(DEVICE) for x in (k, v, s, g)),
                                      initial_state=(hk0.to(DEVICE), hv0.to(DEVICE)), output_final_state=True)
    assert o.requires_grad
    o.sum().backward()
    q_ref = q.detach().double().requires_grad_()
    ro, _ = naive_recurrent_gsa(q_ref, k.double(), v.double(), s.double(), g.double(),
                                initial_state=(hk0.double(), hv0.double()))
    ro.sum().backward()
    assert rel_err(q_dev.grad, q_ref.grad) <= 1e-5


# ---------------------------------------------------------------------------------------------------
# Grouped query heads: one state per kv head, updated once, read by each of its group's query heads

def grouped_step(B, group, H, K, V, M, dtype=torch.float32, seed=0):
    """One decode step's inputs: q with H * group heads, k, v, s, g and the states with H."""
    q, *_ = make_inputs(B, 1, H * group, K, V, M, dtype, "mixed", seed=seed + 1)
    _, k, v, s, g, hk0, hv0 = make_inputs(B, 1, H, K, V, M, dtype, "mixed", seed=seed)
    return q, k, v, s, g, hk0, hv0


# (group, (BK, BV), dtype): every combination on the GPU, a cover of each value in the interpreter
TILE_CASES = [(group, tiles, dtype) for group in (1, 2, 3, 4) for tiles in ((16, 16), (32, 64), (64, 16))
              for dtype in DTYPES]
if not ON_GPU:
    TILE_CASES = [(1, (16, 16), torch.float32), (1, (32, 64), torch.float32), (2, (64, 16), torch.float32),
                  (4, (16, 16), torch.float16), (3, (32, 64), torch.float32)]


@pytest.mark.parametrize("group,tiles,dtype", TILE_CASES, ids=str)
def test_decode_tiles(group, tiles, dtype):
    """K = 48 and V = 80 in 1 to 5 tiles (some partial): the keys' launch writes each K tile's share of
    the scores for every query head of the kv head's group (3: a group padded to a power of two), the
    values' launch sums them over the tiles; the states per kv head and every query head's output as
    the float64 recurrence's."""
    B, H, K, V, M = 2, 2, 48, 80, 12
    q, k, v, s, g, hk0, hv0 = grouped_step(B, group, H, K, V, M, dtype, seed=group + tiles[0])
    dev = [x.to(DEVICE) for x in (q, k, v, s, g)]
    hk0_d, hv0_d = hk0.to(DEVICE), hv0.to(DEVICE)
    hk, hv = torch.full_like(hk0_d, float("nan")), torch.full_like(hv0_d, float("nan"))
    cfg = {"BK": tiles[0], "BV": tiles[1], "num_warps": 2}
    with torch.no_grad():
        o = decode_step(*dev, K ** -0.5, hk0_d, hv0_d, hk, hv, config=cfg)
    assert o.shape == (B, 1, H * group, V) and hk.shape == (B, H, K, M)
    check_step(o, hk, hv, reference_step(q, k, v, s, g, hk0, hv0), dtype)


def test_decode_grouped_heads_on_state_pools():
    """Pools per kv head [S, H, ...]: a row continuing from its slot, a padding row (o = 0 for every
    query head, nothing written), a row starting from zeros in a reused slot; other slots untouched."""
    B, group, H, K, V, M, S = 3, 2, 2, 16, 16, 8, 4
    q, k, v, s, g, _, _ = grouped_step(B, group, H, K, V, M, seed=8)
    gen = torch.Generator().manual_seed(9)
    before = torch.randn(S, H, K, M, generator=gen), torch.randn(S, H, M, V, generator=gen)
    pools = tuple(p.clone().to(DEVICE) for p in before)
    indices, has_state = [3, -1, 0], [True, True, False]
    with torch.no_grad():
        o, returned = fused_recurrent_gsa(*(x.to(DEVICE) for x in (q, k, v, s, g)), initial_state=pools,
                                          state_indices=torch.tensor(indices, device=DEVICE),
                                          has_initial_state=torch.tensor(has_state, device=DEVICE), inplace=True)
    assert returned[0] is pools[0] and returned[1] is pools[1] and o.shape == (B, 1, H * group, V)
    for n, (slot, has) in enumerate(zip(indices, has_state)):
        if slot < 0:
            assert not o[n].any(), "a padding row's output is 0"
            continue
        h0 = tuple(p[slot:slot + 1] if has else torch.zeros_like(p[:1]) for p in before)
        ref = reference_step(*(x[n:n + 1] for x in (q, k, v, s, g)), *h0)
        check_step(o[n:n + 1], pools[0][slot:slot + 1], pools[1][slot:slot + 1], ref, torch.float32)
    for slot in (1, 2):
        assert torch.equal(pools[0][slot].cpu(), before[0][slot]) and torch.equal(pools[1][slot].cpu(), before[1][slot])


# ---------------------------------------------------------------------------------------------------
# GPU-only: the paper's layer shape at the benchmark's batch sizes, and wide slots

@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="paper-size shapes run on the GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("B,H,K,V,M", [(1, 4, 512, 512, 64), (8, 4, 512, 512, 64), (64, 4, 512, 512, 64),
                                       (3, 2, 128, 256, 100), (2, 2, 64, 64, 256)],
                         ids=lambda x: str(x))
def test_decode_large_on_gpu(B, H, K, V, M, dtype):
    q, k, v, s, g, hk0, hv0 = make_inputs(B, 1, H, K, V, M, dtype, "model", seed=B)
    dev = [x.to(DEVICE) for x in (q, k, v, s, g)]
    hk0_d, hv0_d = hk0.to(DEVICE), hv0.to(DEVICE)
    with torch.no_grad():
        o, (hk, hv) = fused_recurrent_gsa(*dev, scale=1.0, initial_state=(hk0_d, hv0_d), output_final_state=True)
    errors = check_step(o, hk, hv, reference_step(q, k, v, s, g, hk0, hv0, scale=1.0), dtype)
    assert torch.equal(hk0_d.cpu(), hk0) and torch.equal(hv0_d.cpu(), hv0)
    print(f"\n{dtype} B{B}-H{H}-K{K}-V{V}-M{M}: " + " ".join(f"{n}={e:.1e}" for n, e in errors.items()))


# ---------------------------------------------------------------------------------------------------
# out= sharing memory: the kernels read the inputs and the initial state while they write the new
# states, so a buffer that overlaps something still to be read corrupts the step (or the two new
# states overwrite each other). Only out=(hk0, hv0), in this order, is the in-place update.

ALIAS_SIZES = dict(B=2, H=2, K=16, V=16, M=16)   # K = V = M: hk and hv have the same shape


def _in(storage, x):
    """x's values placed at the start of `storage` (a flat float32 tensor), as a view of x's shape."""
    view = storage[:x.numel()].view(x.shape)
    view.copy_(x)
    return view


def aliasing_case(case, T=1):
    """(inputs, initial_state, out, reference) for one way of sharing memory; the reference is the
    float64 recurrence on copies of the values taken before the call."""
    B, H, K, V, M = ALIAS_SIZES.values()
    q, k, v, s, g, hk0, hv0 = make_inputs(B, T, H, K, V, M, torch.float32, "mixed", seed=9)
    ref = reference_step(q, k, v, s, g, hk0, hv0)
    ins = {name: x.to(DEVICE) for name, x in zip("qkvsg", (q, k, v, s, g))}
    hk0, hv0 = hk0.to(DEVICE), hv0.to(DEVICE)
    n = hk0.numel()
    out = (torch.empty_like(hk0), torch.empty_like(hv0))
    if case == "crosswise":                # the states swapped: the new hk lands on hv0 before it is read
        out = (hv0, hk0)
    elif case == "one_buffer_twice":
        out = (out[0], out[0])
    elif case == "out_pair_overlap":       # two views of one storage, 64 floats in common
        big = torch.empty(2 * n - 64, device=DEVICE)
        out = (big[:n].view(hk0.shape), big[n - 64:].view(hv0.shape))
    elif case == "hk0_shifted":            # out[0] on hk0's storage, one row of slots further on
        big = torch.empty(n + M, device=DEVICE)
        hk0 = _in(big, hk0)
        out = (big[M:].view(hk0.shape), out[1])
    elif case == "hv0_in_out0":            # the other state, partly: hv0 starts 64 floats into out[0]
        big = torch.empty(n + 64, device=DEVICE)
        hv0 = _in(big[64:], hv0)
        out = (big[:n].view(hk0.shape), out[1])
    elif case in ("q", "k", "s", "g"):     # an input in the first bytes of out[0]
        big = torch.empty(n, device=DEVICE)
        ins[case] = _in(big, ins[case])
        out = (big.view(hk0.shape), out[1])
    elif case == "v":                      # v in the first bytes of out[1]
        big = torch.empty(n, device=DEVICE)
        ins["v"] = _in(big, ins["v"])
        out = (out[0], big.view(hv0.shape))
    elif case == "inplace":                # allowed: the same buffers, in the same order
        out = (hk0, hv0)
    elif case == "inplace_hk_only":        # allowed: hk in place, hv into a new buffer
        out = (hk0, out[1])
    elif case == "disjoint_views":         # allowed: every tensor a separate part of one storage
        big = torch.empty(2 * n + sum(x.numel() for x in ins.values()), device=DEVICE)
        out = (big[:n].view(hk0.shape), big[n:2 * n].view(hv0.shape))
        at = 2 * n
        for name, x in ins.items():
            ins[name] = _in(big[at:], x)
            at += x.numel()
    else:
        raise AssertionError(case)
    return [ins[name] for name in "qkvsg"], (hk0, hv0), out, ref


REJECTED = [  # (case, the error's words: the argument and what it conflicts with)
    ("crosswise", r"out\[0\] \(hk\) shares memory with initial_state\[1\] \(hv0\), the other state"),
    ("one_buffer_twice", r"out\[0\] \(hk\) and out\[1\] \(hv\) share memory"),
    ("out_pair_overlap", r"out\[0\] \(hk\) and out\[1\] \(hv\) share memory"),
    ("hk0_shifted", r"out\[0\] \(hk\) overlaps initial_state\[0\] \(hk0\) without being the very same"),
    ("hv0_in_out0", r"out\[0\] \(hk\) shares memory with initial_state\[1\] \(hv0\)"),
    ("q", r"out\[0\] \(hk\) shares memory with q:"),
    ("k", r"out\[0\] \(hk\) shares memory with k:"),
    ("v", r"out\[1\] \(hv\) shares memory with v:"),
    ("s", r"out\[0\] \(hk\) shares memory with s:"),
    ("g", r"out\[0\] \(hk\) shares memory with g:"),
]


@pytest.mark.parametrize("T", [1, 3], ids=["decode", "T3"])
@pytest.mark.parametrize("case,words", REJECTED, ids=[c for c, _ in REJECTED])
def test_out_sharing_memory_is_an_error(case, words, T):
    """Each of these gives a wrong o or new state when run (the kernels overwrite what they still have
    to read): a ValueError naming the buffer and what it shares memory with, before anything is written."""
    ins, state, out, _ = aliasing_case(case, T)
    before = [x.clone() for x in (*ins, *state, *out)]
    with torch.no_grad(), pytest.raises(ValueError, match=words):
        fused_recurrent_gsa(*ins, initial_state=state, out=out)
    # bitwise: the empty buffers may hold NaNs
    assert all(torch.equal(x.view(torch.int32), b.view(torch.int32)) for x, b in zip((*ins, *state, *out), before))


def test_inplace_on_one_buffer_for_both_states_is_an_error():
    """inplace=True with hk0 and hv0 the same memory (K = V = M): the two updates would collide."""
    ins, (hk0, _), _, _ = aliasing_case("inplace")
    with torch.no_grad(), pytest.raises(ValueError, match=r"initial_state\[0\] \(hk0, updated in place\) "
                                                          r"and initial_state\[1\] \(hv0, updated in place\)"):
        fused_recurrent_gsa(*ins, initial_state=(hk0, hk0), inplace=True)


@pytest.mark.parametrize("T", [1, 3], ids=["decode", "T3"])
@pytest.mark.parametrize("case", ["inplace", "inplace_hk_only", "disjoint_views"])
def test_out_sharing_that_is_allowed(case, T):
    """out=(hk0, hv0) in the same order is the in-place update (also for one state alone), and separate
    parts of one storage do not overlap: all give the recurrence's result."""
    ins, state, out, ref = aliasing_case(case, T)
    with torch.no_grad():
        o, (hk, hv) = fused_recurrent_gsa(*ins, initial_state=state, out=out)
    assert hk is out[0] and hv is out[1]
    check_step(o, hk, hv, ref, torch.float32)


_SM90_DECODE_PTX = """
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gsa_kernels.kernels import decode
pdl = json.loads(sys.argv[1])
out = {}
for name in ("decode_keys_kernel", "decode_values_kernel"):
    fn = getattr(decode, name)
    params = list(inspect.signature(fn.fn).parameters)
    const = {p: v for p, v in dict(H=4, G=1, GP=1, K=512, V=512, M=64, BM=64, BK=16, BV=16, NKT=32, NKTP=32,
             USE_INITIAL_STATE=True, STORE_STATE=True, POOLED=False, PDL=pdl).items() if p in params}
    ptr = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "s": "*bf16", "g": "*bf16", "o": "*bf16", "scale": "fp32",
           "state_indices": "*i32", "has_initial_state": "*i8"}
    sig = {p: "constexpr" if p in const else ptr.get(p, "*fp32") for p in params}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 1, "launch_pdl": pdl and name == "decode_values_kernel"})
    out[name] = [ln.strip() for ln in kernel.asm["ptx"].splitlines()]
print(json.dumps(out))
"""


@pytest.mark.parametrize("pdl", [True, False])
def test_decode_values_wait_for_the_keys_only_before_reading_their_scores(pdl):
    """With programmatic dependent launch the values' launch runs beside the keys': it may update and
    store its Hv tile at once, but must read the keys' partial scores only after griddepcontrol.wait.
    Compiled for sm90 (no GPU needed; the interpreter cannot run PDL): in the values kernel the wait
    comes after every float32 (state) store and before the bf16 store of o; the keys kernel releases
    its dependents; without PDL neither instruction appears."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _SM90_DECODE_PTX, json.dumps(pdl)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ptx = json.loads(run.stdout.splitlines()[-1])
    keys, values = ptx["decode_keys_kernel"], ptx["decode_values_kernel"]
    waits = [i for i, ln in enumerate(values) if ln.startswith("griddepcontrol.wait")]
    releases = [ln for ln in keys if ln.startswith("griddepcontrol.launch_dependents")]
    if not pdl:
        assert not waits and not releases and not any("griddepcontrol" in ln for ln in values)
        return
    assert len(waits) == 1 and len(releases) == 1
    state_stores = [i for i, ln in enumerate(values) if "st.global.b32" in ln or "st.global.v" in ln]
    o_stores = [i for i, ln in enumerate(values) if "st.global.b16" in ln]
    assert state_stores and o_stores
    assert max(state_stores) < waits[0] < min(o_stores)
    assert any("ld.global" in ln for ln in values[waits[0]:])      # the partial scores, read after it
