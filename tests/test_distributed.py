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
    "3 ranks kernels grouped heads": ([5, 17, 2], torch.float32, "kernels", True, True, 16),
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


def _worker(rank, world, init_file, out_dir, cases):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for case in cases:
            torch.save(_rank_run(case, rank), os.path.join(out_dir, f"{case}.{rank}.pt"))
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


@pytest.mark.parametrize("world", [2, 3])
def test_context_parallel_equals_one_process(world):
    """Each group of ranks runs its cases in one spawn (a process start costs seconds)."""
    cases = [c for c in CASES if len(CASES[c][0]) == world]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp, cases), nprocs=world, join=True)
        results = {c: [torch.load(os.path.join(tmp, f"{c}.{r}.pt")) for r in range(world)] for c in cases}
    for case in cases:
        _check(case, results[case])


def _one_rank_group(backend):
    store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=0, world_size=1)


def test_one_rank_equals_chunk_gsa():
    """A one-rank group (NCCL on a GPU, gloo here) is chunk_gsa itself: forward and every gradient."""
    from gsa_kernels import chunk_gsa
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    q, k, v, s, g, hk0, hv0 = (t.to(DEVICE) for t in make_inputs(2, 40, 2, 16, 16, 16, dtype, "model", seed=8))
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
