"""Context parallelism (gsa_kernels/distributed.py): a sequence split along time over the ranks of a
gloo group (processes on the CPU) gives every rank its slice of chunk_gsa's output and the whole
sequences' final states, with every gradient, as one process running the whole sequence does.

The ranks' total loss, sum_r <o_r, W_r> + <hk_T, A_r> + <hv_T, C_r>, is compared with one process's
<o, W> + <hk_T, sum_r A_r> + <hv_T, sum_r C_r> on the float64 recurrence (reference/), by relative L2
error with the contract's bounds. Cases: 2 and 3 ranks, uneven slices with one shorter than a chunk,
with and without initial states, grouped query heads (kernels), the pure-PyTorch chunked form in
float64 (fast) and the Triton kernels (the interpreter here, CUDA on a GPU) in float32.
"""
from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import DEVICE, ON_GPU
from test_chunk import BOUNDS, make_inputs, rel_err

from gsa_kernels.distributed import chunk_gsa_cp
from reference import naive_recurrent_gsa

NAMES = ("q", "k", "v", "s", "g", "hk0", "hv0")
# (slices of T, dtype, op, initial state, grouped query heads, chunk size)
CASES = {
    "2 ranks torch": ([13, 24], torch.float64, "torch", True, False, 16),
    "3 ranks torch uneven": ([20, 3, 14], torch.float64, "torch", False, False, 16),
    "2 ranks kernels": ([9, 23], torch.float32, "kernels", True, False, 16),
    "3 ranks kernels grouped heads": ([5, 9, 2], torch.float32, "kernels", True, True, 16),
}
B, H, K, V, M = 2, 2, 8, 8, 4


def _problem(case):
    slices, dtype, _, with_h0, gqa, _ = CASES[case]
    T = sum(slices)
    q, k, v, s, g, hk0, hv0 = make_inputs(B, T, H, K, V, M, dtype, "model", seed=3, initial_state=with_h0)
    if with_h0 and dtype == torch.float64:
        hk0, hv0 = hk0.double(), hv0.double()
    if gqa:        # two query heads per kv head
        q = torch.cat([q, make_inputs(B, T, H, K, V, M, dtype, "model", seed=4)[0]], dim=2)
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(B, T, q.shape[2], V, generator=gen, dtype=torch.float64)
    A = [torch.randn(B, H, K, M, generator=gen, dtype=torch.float64) for _ in slices]
    C = [torch.randn(B, H, M, V, generator=gen, dtype=torch.float64) for _ in slices]
    return dict(q=q, k=k, v=v, s=s, g=g, hk0=hk0, hv0=hv0), W, A, C


def _rank_run(case, rank):
    """This rank's slice: (o, hk_T, hv_T, {input: gradient}) after its backward."""
    from gsa_kernels import chunk_gsa
    from gsa_kernels.torch_chunked import chunk_gsa_torch
    slices, dtype, op, with_h0, _, chunk = CASES[case]
    full, W, A, C = _problem(case)
    t0, t1 = sum(slices[:rank]), sum(slices[:rank + 1])
    x = {n: (t[:, t0:t1] if n not in ("hk0", "hv0") else t) for n, t in full.items() if t is not None}
    x = {n: t.to(DEVICE).requires_grad_() for n, t in x.items()}
    h0 = (x["hk0"], x["hv0"]) if with_h0 else None
    o, (hk, hv) = chunk_gsa_cp(x["q"], x["k"], x["v"], x["s"], x["g"], initial_state=h0, output_final_state=True,
                               op=chunk_gsa_torch if op == "torch" else chunk_gsa, chunk_size=chunk)
    loss = (o.double() * W[:, t0:t1].to(DEVICE)).sum() + (hk.double() * A[rank].to(DEVICE)).sum() \
        + (hv.double() * C[rank].to(DEVICE)).sum()
    loss.backward()
    return {"o": o.detach().cpu(), "hk": hk.detach().cpu(), "hv": hv.detach().cpu(),
            **{"d" + n: t.grad.cpu() for n, t in x.items()}}


# --- the model: context parallel (slices of the same sequences), DDP and FSDP2 (halves of the batch)
MODEL = dict(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, num_slots=4,
             use_short_conv=True, conv_size=3)
MODEL_SLICES = [5, 7]           # of T = 12: each at least conv_size


def _model(group=None):
    from gsa_kernels.layers import GSAModel
    torch.manual_seed(0)
    return GSAModel(**MODEL, context_parallel_group=group).to(DEVICE)


def _tokens():
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, MODEL["vocab_size"], (2, sum(MODEL_SLICES)), generator=gen)
    labels = ids.clone()
    labels[0, 4] = labels[1, 9] = -100           # unlabelled tokens, one of them at a slice's first
    return ids.to(DEVICE), labels.to(DEVICE)


def _grads(model):
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name] = g.detach().cpu().clone()
    return out


def _model_run(case, rank, world):
    """What this rank saves: logits slice, loss and parameter gradients (summed over the CP ranks)."""
    ids, labels = _tokens()
    if case == "model cp":
        model = _model(dist.group.WORLD)
        t0, t1 = sum(MODEL_SLICES[:rank]), sum(MODEL_SLICES[:rank + 1])
        logits, _ = model(ids[:, t0:t1])
        loss, _ = model(ids[:, t0:t1], labels=labels[:, t0:t1])
        loss.backward()
        grads = _grads(model)
        for g in grads.values():
            dist.all_reduce(g)
        return {"logits": logits.detach().cpu(), "loss": loss.detach().cpu(), "grads": grads}
    model = _model()
    if case == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:                        # FSDP2: each block its own unit, then the root
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(DEVICE, (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    labels = labels.clone()
    labels[:, -1] = -100          # equal labelled counts per row: the mean of the ranks' means is the whole's
    loss, _ = model(ids[rank:rank + 1], labels=labels[rank:rank + 1])
    loss.backward()
    return {"loss": loss.detach().cpu(), "grads": _grads(model.module if case == "ddp" else model)}


def _worker(rank, world, init_file, out_dir, cases):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for case in cases:
            run = _rank_run(case, rank) if case in CASES else _model_run(case, rank, world)
            torch.save(run, os.path.join(out_dir, f"{case}.{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _expected(case):
    """The one-process answer in float64 (the recurrence), with the ranks' final-state weights summed."""
    slices, _, _, with_h0, _, _ = CASES[case]
    full, W, A, C = _problem(case)
    x = {n: t.double().requires_grad_() for n, t in full.items() if t is not None}
    h0 = (x["hk0"], x["hv0"]) if with_h0 else None
    o, (hk, hv) = naive_recurrent_gsa(x["q"], x["k"], x["v"], x["s"], x["g"], initial_state=h0,
                                      output_final_state=True)
    ((o * W).sum() + (hk * sum(A)).sum() + (hv * sum(C)).sum()).backward()
    return o.detach(), hk.detach(), hv.detach(), {"d" + n: t.grad for n, t in x.items()}


def _check(case, per_rank):
    slices, dtype, _, _, _, _ = CASES[case]
    o, hk, hv, grads = _expected(case)
    bound = 1e-10 if dtype == torch.float64 else BOUNDS[dtype][1]
    errors = {"o": rel_err(torch.cat([r["o"] for r in per_rank], dim=1), o)}
    for r, got in enumerate(per_rank):
        errors[f"hk (rank {r})"] = rel_err(got["hk"], hk)
        errors[f"hv (rank {r})"] = rel_err(got["hv"], hv)
    for name, ref in grads.items():
        if name in ("dhk0", "dhv0"):        # the whole sequences' gradient, on every rank
            errors.update({f"{name} (rank {r})": rel_err(got[name], ref) for r, got in enumerate(per_rank)})
        else:
            errors[name] = rel_err(torch.cat([got[name] for got in per_rank], dim=1), ref)
    assert max(errors.values()) <= bound, errors


# gloo gathers CPU tensors only, and NCCL takes one rank per GPU: the multi-rank tests run where there is
# no GPU (CI); a GPU runs the one-rank NCCL test below
MULTI_RANK = pytest.mark.skipif(ON_GPU, reason="multi-rank gloo tests run on CPU machines (CI); one GPU: NCCL, one rank")


MODEL_CASES = ["model cp", "ddp", "fsdp2"]     # on 2 ranks


@functools.lru_cache(maxsize=None)
def _spawn(world):
    """Every case of `world` ranks in one spawn (starting processes costs seconds on CI's 2 cores):
    {case: [per rank]}, shared by the tests that check them."""
    cases = [c for c in CASES if len(CASES[c][0]) == world] + (MODEL_CASES if world == 2 else [])
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp, cases), nprocs=world, join=True)
        return {c: [torch.load(os.path.join(tmp, f"{c}.{r}.pt")) for r in range(world)] for c in cases}


@MULTI_RANK
@pytest.mark.parametrize("world", [2, 3])
def test_context_parallel_equals_one_process(world):
    results = _spawn(world)
    for case in CASES:
        if len(CASES[case][0]) == world:
            _check(case, results[case])


# two float32 computations of the same model (each op within the contract of the float64 recurrence):
# this checks the wiring (slices, exchanges, gradient sums), so a loose bound suffices
MODEL_BOUND = 1e-4


@MULTI_RANK
def test_model_context_parallel_ddp_and_fsdp2_equal_one_process():
    """GSAModel over 2 ranks: context parallel (each rank a slice of the same sequences: logits, the
    loss, and the parameter gradients summed over ranks), DDP and FSDP2 (each rank one sequence of
    the batch: averaged gradients) equal one process on the whole batch."""
    results = _spawn(2)
    ids, labels = _tokens()
    model = _model()
    logits, _ = model(ids)
    loss, _ = model(ids, labels=labels)
    loss.backward()
    cp = results["model cp"]
    errors = {"logits": rel_err(torch.cat([r["logits"] for r in cp], dim=1), logits),
              "loss": rel_err(sum(r["loss"] for r in cp), loss)}
    errors.update({f"d {n}": rel_err(cp[0]["grads"][n], g) for n, g in _grads(model).items()})
    assert max(errors.values()) <= MODEL_BOUND, errors
    model.zero_grad()
    labels[:, -1] = -100
    loss, _ = model(ids, labels=labels)
    loss.backward()
    for case in ("ddp", "fsdp2"):
        errors = {"loss": rel_err(sum(r["loss"] for r in results[case]) / 2, loss)}
        for r, got in enumerate(results[case]):
            errors.update({f"d {n} (rank {r})": rel_err(got["grads"][n], g) for n, g in _grads(model).items()})
        assert max(errors.values()) <= MODEL_BOUND, (case, errors)


def _one_rank_group(backend):
    store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=0, world_size=1)


def test_one_rank_equals_chunk_gsa():
    """A one-rank group (NCCL on a GPU, gloo here) is chunk_gsa itself: forward and every gradient."""
    from gsa_kernels import chunk_gsa
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    q, k, v, s, g, hk0, hv0 = (t.to(DEVICE) for t in make_inputs(2, 24, 2, 16, 16, 16, dtype, "model", seed=8))
    _one_rank_group("nccl" if ON_GPU else "gloo")
    try:
        outs = []
        for cp in (True, False):
            x = [t.clone().requires_grad_() for t in (q, k, v, s, g, hk0, hv0)]
            fn = chunk_gsa_cp if cp else chunk_gsa
            o, (hk, hv) = fn(*x[:5], initial_state=(x[5], x[6]), output_final_state=True)
            gen = torch.Generator().manual_seed(9)
            ws = [torch.randn(t.shape, generator=gen).to(DEVICE) for t in (o, hk, hv)]
            sum((t.float() * w).sum() for t, w in zip((o, hk, hv), ws)).backward()
            outs.append([o, hk, hv] + [t.grad for t in x])
    finally:
        dist.destroy_process_group()
    bound = BOUNDS[dtype][1]
    errors = {name: rel_err(a, b) for name, a, b in zip(("o", "hk", "hv") + NAMES, *outs)}
    # the summary pass adds only float32 rounding: the one-rank fold is the identity on the states
    assert max(errors.values()) <= bound, errors


def test_bad_calls_name_the_argument():
    q, k, v, s, g, _, _ = make_inputs(1, 8, 1, 4, 4, 4, torch.float32, "model", initial_state=False)
    with pytest.raises(ValueError, match="g=None"):
        chunk_gsa_cp(q, k, v, s, None)
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk_gsa_cp(q, k, v, s, g, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(RuntimeError, match="init_process_group"):
        chunk_gsa_cp(q, k, v, s, g)
