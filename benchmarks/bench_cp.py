"""Context parallelism (gsa_kernels/distributed.py) on N GPUs: forward+backward time and peak memory
per GPU against the total sequence length T, each rank holding T / N tokens of the same sequences.

    torchrun --nproc-per-node N -m benchmarks.bench_cp [--T 65536,262144,1048576] [--B 1] [--H 4]
             [--D 512] [--M 64] [--dtype bf16] [--reps 10] [--json PATH]

Times are wall-clock medians over `reps` training steps (forward, backward, the two collectives) with a
barrier before each, from rank 0's clock; memory is the most any rank allocated during a step beyond
its inputs. A T whose slice does not fit a GPU is reported as out of memory and the sweep goes on.
On a machine without GPUs it runs over gloo on the CPU (a smoke run: use small T there).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from gsa_kernels.distributed import chunk_gsa_cp

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def step(xs, w):
    o, _ = chunk_gsa_cp(*xs, output_final_state=False)
    torch.autograd.backward(o, w)


def measure(T, args, device, world):
    B, H, D, M = args.B, args.H, args.D, args.M
    Tr = T // world
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype).requires_grad_()

    q, k, v = rand(B, Tr, H, D), rand(B, Tr, H, D), rand(B, Tr, H, D)
    f = torch.randn(B, Tr, H, M, generator=gen, device=device)
    g = (torch.nn.functional.logsigmoid(f) / 8).to(dtype).requires_grad_()
    s = (1 - g.detach().float().exp()).to(dtype).requires_grad_()
    xs, w = (q, k, v, s, g), torch.randn(B, Tr, H, D, generator=gen, device=device).to(dtype)
    step(xs, w)                                   # compile and warm up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.reps):
        dist.barrier()
        t0 = time.perf_counter()
        step(xs, w)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.tensor([(torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device.type == "cuda" else 0.0],
                        device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {"T": T, "ranks": world, "tokens_per_rank": Tr, "fwd_bwd_ms": round(statistics.median(times), 3),
            "peak_MiB_per_rank": round(peak.item(), 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="65536,262144,1048576")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=512, help="K = V per head")
    ap.add_argument("--M", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    rows = []
    try:
        for T in (int(x) for x in args.T.split(",")):
            try:
                row = measure(T, args, device, world)
            except torch.OutOfMemoryError:
                row = {"T": T, "ranks": world, "error": "out of memory"}
                torch.cuda.empty_cache()
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    finally:
        dist.destroy_process_group()
    if rank == 0 and args.json:
        name = torch.cuda.get_device_name() if on_gpu else "cpu (gloo)"
        with open(args.json, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, "shape": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
