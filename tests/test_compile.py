"""torch.compile: the custom ops of gsa_kernels/ops.py pass `torch.library.opcheck`, and models built
from the layers compile with fullgraph=True (no graph break), give eager's outputs and gradients, and
do not recompile or re-tune when T changes.

Backends: Inductor on CUDA; on CPU (Triton's interpreter) "aot_eager", which runs the same Dynamo
capture, fake implementations and AOTAutograd as Inductor but leaves the surrounding ops to eager
PyTorch, so CI needs no C++ compiler.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch._inductor.config
import torch.nn.functional as F

from conftest import DEVICE, ON_GPU
from gsa_kernels import chunk_gsa, fused_recurrent_gsa, launches, ops
from gsa_kernels.layers import GatedSlotAttention, GSAModel
from test_chunk import rel_err

BACKEND = "inductor" if ON_GPU else "aot_eager"
# compiled vs eager: the same kernels on the same inputs; Inductor may fuse the projections' epilogues
# differently, so float32 gets a little room beyond bit-exactness, bfloat16 its rounding
BOUND = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def gsa_inputs(B=1, T=20, H=2, K=16, V=16, M=8, dtype=torch.float32, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, M, generator=gen)) / 4
    s = 1 - g.exp()
    return [x.to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad) for x in (q, k, v, s, g)]


def states(N=1, H=2, K=16, V=16, M=8, seed=1, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    hk, hv = torch.randn(N, H, K, M, generator=gen), torch.randn(N, H, M, V, generator=gen)
    return [x.to(DEVICE).requires_grad_(requires_grad) for x in (hk, hv)]


# ---------------------------------------------------------------------------------------------------
# opcheck: schema, fake implementation, autograd registration, AOT dispatch with dynamic shapes

def _opcheck(op, args):
    torch.library.opcheck(op, args, raise_exception=True)


def _cover(cases, levels=(0, 2)):
    """Every (case, checkpoint level) on a GPU; in the interpreter (CI's time) each case once, the
    levels taken in turn, so that every case and every level is still checked."""
    if ON_GPU:
        return [(c, lv) for c in cases for lv in levels]
    return [(c, levels[i % len(levels)]) for i, c in enumerate(cases)]


# "half": float16 inputs, whose Hv chunk states the forward keeps at level 0 as scaled float16
@pytest.mark.parametrize("case,level", _cover(["plain", "states", "varlen", "gqa-chunk16", "half"]))
def test_opcheck_chunk_fwd(case, level):
    dtype = torch.float16 if case == "half" else torch.float32
    q, k, v, s, g = gsa_inputs(T=37, dtype=dtype, requires_grad=True)
    hk0 = hv0 = cu = None
    chunk_size, final = 0, case != "plain"
    if case == "states":
        hk0, hv0 = states(requires_grad=True)
    if case == "varlen":
        cu = torch.tensor([0, 1, 18, 37], dtype=torch.int32, device=DEVICE)
    if case == "gqa-chunk16":     # 4 query heads over the 2 kv heads
        chunk_size = 16
        q = gsa_inputs(T=37, H=4, seed=3, requires_grad=True)[0]
    _opcheck(ops.chunk_gsa_fwd_op, (q, k, v, s, g, hk0, hv0, cu, 0.25, chunk_size, final, level))


@pytest.mark.parametrize("case,level", _cover(["half", "plain", "gqa-states-final"]))
def test_opcheck_chunk_bwd(case, level):
    q, k, v, s, g = gsa_inputs(T=37, dtype=torch.float16 if case == "half" else torch.float32)
    if case.startswith("gqa"):     # 4 query heads over the 2 kv heads
        q = gsa_inputs(T=37, H=4, seed=3)[0]
    hk0, hv0 = states() if case != "plain" else (None, None)
    o, scores, hk_chunks, hv_chunks, hv_scales, _, _ = ops.chunk_gsa_fwd_op(q, k, v, s, g, hk0, hv0, None, 0.25,
                                                                            0, True, level)
    do = torch.randn_like(o)
    dhk, dhv = states(seed=2) if case != "plain" else (None, None)
    _opcheck(ops.chunk_gsa_bwd_op, (q, k, v, s, g, do, dhk, dhv, scores, hk_chunks, hv_chunks, hv_scales,
                                    hk0, hv0, None, 0.25, 0, level))


@pytest.mark.parametrize("case", ["plain", "gqa-states", "varlen"])
def test_opcheck_recurrent_fwd(case):
    q, k, v, s, g = gsa_inputs(T=9, requires_grad=True)
    if case.startswith("gqa"):     # 4 query heads over the 2 kv heads
        q = gsa_inputs(T=9, H=4, seed=3, requires_grad=True)[0]
    hk0, hv0 = states(requires_grad=True) if case.endswith("states") else (None, None)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE) if case == "varlen" else None
    _opcheck(ops.recurrent_fwd_op, (q, k, v, s, g, hk0, hv0, cu, 0.25, case != "plain"))


def test_opcheck_recurrent_bwd():
    q, k, v, s, g = gsa_inputs(T=9)
    q = gsa_inputs(T=9, H=4, seed=3)[0]     # grouped: 4 query heads over the 2 kv heads
    hk0, hv0 = states()
    o, scores, hk, hv = ops.recurrent_fwd_op(q, k, v, s, g, hk0, hv0, None, 0.25, True)
    dhk, dhv = states(seed=2)
    _opcheck(ops.recurrent_bwd_op, (q, k, v, s, g, scores, hk0, hv0, hk, hv, torch.randn_like(o), dhk, dhv,
                                    None, 0.25))


@pytest.mark.parametrize("store", [True, False])
def test_opcheck_decode(store):
    q, k, v, s, g = gsa_inputs(B=3, T=1)
    if store:     # grouped: 4 query heads over the 2 kv heads
        q = gsa_inputs(B=3, T=1, H=4, seed=3)[0]
    hk0, hv0 = states(N=3)
    _opcheck(ops.decode_step_op, (q, k, v, s, g, hk0, hv0, 0.25, store))


# ---------------------------------------------------------------------------------------------------
# the public ops under torch.compile(fullgraph=True)

def _counted(fn):
    """torch.compile(fn, fullgraph=True) with a frame counter: frame_count = compilations."""
    counter = torch._dynamo.testing.CompileCounterWithBackend(BACKEND)
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def dynamic_length(*tensors):
    """Mark dim 1 (T) dynamic, as a user does for variable-length batches: Dynamo then raises if any
    code specializes on T, and compiles one graph for every T."""
    for x in tensors:
        torch._dynamo.mark_dynamic(x, 1)
    return tensors


def _recompile_reasons() -> str:
    """Dynamo's guard failures so far (what made it compile again), for an assertion message."""
    return "; ".join(str(r) for reasons in torch._dynamo.utils.guard_failures.values() for r in reasons)


def _grads(fn, inputs):
    for x in inputs:
        x.grad = None
    out = fn(*inputs)
    out.backward()
    return out.detach(), [x.grad.clone() for x in inputs]


@pytest.mark.parametrize("op_name", ["chunk", "recurrent"])
def test_op_compiles_without_recompiling_for_new_T(op_name):
    """Forward and backward of the op in one compiled function (states in and out, every gradient):
    equal to eager, one compilation for every length (one of them a single chunk), no autotuning."""
    op = chunk_gsa if op_name == "chunk" else fused_recurrent_gsa

    def loss(q, k, v, s, g, hk0, hv0):
        o, (hk, hv) = op(q, k, v, s, g, scale=0.5, initial_state=(hk0, hv0), output_final_state=True)
        return (o * o).sum() + (hk * hk).sum() + (hv.sin()).sum()

    compiled, counter = _counted(loss)
    before = launches.stats()["autotune_benchmarks"]
    # the interpreter runs the token-by-token kernel's steps one by one: its longest length is a GPU's
    lengths = (37, 70, 21, 2) if ON_GPU or op_name == "chunk" else (37, 21, 2)
    for T in lengths:
        inputs = gsa_inputs(T=T, seed=T, requires_grad=True) + states(requires_grad=True)
        dynamic_length(*inputs[:5])
        ref, ref_grads = _grads(loss, inputs)
        out, grads = _grads(compiled, inputs)
        assert rel_err(out, ref) <= 1e-6
        for got, want in zip(grads, ref_grads):
            assert rel_err(got, want) <= 1e-6
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for {len(lengths)} lengths: " \
                                     f"{_recompile_reasons()}"
    assert launches.stats()["autotune_benchmarks"] == before


def test_varlen_and_out_buffers_compile():
    """cu_seqlens through the compiled chunk op, and the decode step writing `out=` buffers."""
    q, k, v, s, g = gsa_inputs(T=37)
    cu = torch.tensor([0, 1, 18, 37], dtype=torch.int32, device=DEVICE)

    def packed(q, k, v, s, g, cu):
        return chunk_gsa(q, k, v, s, g, cu_seqlens=cu, output_final_state=True)

    (o, (hk, hv)), (ro, (rhk, rhv)) = _counted(packed)[0](q, k, v, s, g, cu), packed(q, k, v, s, g, cu)
    for got, want in ((o, ro), (hk, rhk), (hv, rhv)):
        assert rel_err(got, want) <= 1e-6

    q, k, v, s, g = gsa_inputs(B=3, T=1, seed=5)
    hk0, hv0 = states(N=3)

    def step(q, k, v, s, g, hk0, hv0, hk_out, hv_out):
        o, _ = fused_recurrent_gsa(q, k, v, s, g, initial_state=(hk0, hv0), out=(hk_out, hv_out))
        return o

    bufs, ref_bufs = [torch.zeros_like(hk0), torch.zeros_like(hv0)], [torch.zeros_like(hk0), torch.zeros_like(hv0)]
    with torch.no_grad():
        o = _counted(step)[0](q, k, v, s, g, hk0, hv0, *bufs)
        ro = step(q, k, v, s, g, hk0, hv0, *ref_bufs)
    for got, want in ((o, ro), (bufs[0], ref_bufs[0]), (bufs[1], ref_bufs[1])):
        assert rel_err(got, want) <= 1e-6


# ---------------------------------------------------------------------------------------------------
# models from the layers

def small_model(dtype):
    torch.manual_seed(0)
    hidden, heads = (256, 4) if ON_GPU else (32, 2)
    model = GSAModel(vocab_size=97, hidden_size=hidden, num_layers=2, num_heads=heads, num_slots=12,
                     num_kv_heads=heads // 2, use_output_gate=True)
    return model.to(device=DEVICE, dtype=dtype)


DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_training_step_compiles_fullgraph(dtype, monkeypatch):
    """GSAModel forward + its own loss (labels=) + backward: zero graph breaks (fullgraph=True raises
    at the first, naming it), eager's loss (the chunked one) and parameter gradients, and no
    recompilation when T changes (T is dynamic: the eager loss's loop over token chunks would
    specialize it)."""
    model = small_model(dtype).train()

    def step_loss(ids):
        return model(ids, labels=ids)[0]

    # Inductor's own bf16 matmul padding (pad_mm) guards on the LM head's row count 2*T against the
    # vocabulary: a recompile that is Inductor's heuristic, not these ops; off here so that the count
    # below measures what gsa_kernels contributes
    compiled, counter = _counted(step_loss)
    monkeypatch.setattr(torch._inductor.config, "shape_padding", False)
    for T in (40, 72, 33) if ON_GPU else (40, 33):      # a new T, and one off the 16-multiples
        ids, = dynamic_length(torch.randint(0, 97, (2, T), device=DEVICE))
        model.zero_grad()
        ref = step_loss(ids)
        ref.backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        loss = compiled(ids)
        loss.backward()
        assert rel_err(loss, ref) <= BOUND[dtype]
        for n, p in model.named_parameters():
            assert rel_err(p.grad, ref_grads[n]) <= BOUND[dtype] * 10, n
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 3 lengths: {_recompile_reasons()}"


def test_layer_prefill_and_decode_compile():
    """The layer's inference side compiled: a chunk prefill with a cache, then token-by-token steps
    on it (the decode custom op), equal to eager."""
    torch.manual_seed(0)
    layer = GatedSlotAttention(hidden_size=32, num_heads=2, num_slots=12, recurrent_threshold=4).to(DEVICE).eval()
    x = torch.randn(2, 23, 32, device=DEVICE)
    compiled, counter = _counted(lambda x, state: layer.mix(x, state=state, use_cache=True))
    with torch.no_grad():
        y, state = compiled(x[:, :20], None)
        ry, rstate = layer.mix(x[:, :20], use_cache=True)
        assert rel_err(y, ry) <= 1e-6
        for t in range(20, 23):
            y, state = compiled(x[:, t:t + 1], state)
            ry, rstate = layer.mix(x[:, t:t + 1], state=rstate, use_cache=True)
            assert rel_err(y, ry) <= 1e-6
            for got, want in zip(state, rstate):
                assert rel_err(got, want) <= 1e-6
