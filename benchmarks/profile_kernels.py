"""Where the time goes: per-kernel CUDA time of one chunk_gsa forward + backward, and each compiled
kernel's registers and spills.    python -m benchmarks.profile_kernels [--shapes a,b]"""
from __future__ import annotations

import argparse

import torch

from benchmarks.bench_chunk import SHAPES, make_inputs


def compiled_kernel_report():
    from gsa_kernels.kernels import chunk_bwd, chunk_fwd, cumsum, states
    fns = [cumsum.chunk_cumsum_kernel, states.states_fwd_kernel, chunk_fwd.chunk_fwd_kernel,
           chunk_bwd.chunk_bwd_dscores_kernel, states.states_bwd_kernel, chunk_bwd.chunk_bwd_kernel]
    for fn in fns:
        for caches in fn.device_caches.values():
            for key, kern in caches[0].items():
                n_regs, n_spills = getattr(kern, "n_regs", "?"), getattr(kern, "n_spills", "?")
                smem = getattr(kern.metadata, "shared", "?")
                print(f"  {fn.fn.__name__:28s} regs {n_regs} spills {n_spills} smem {smem}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="a,b")
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args(argv)
    from gsa_kernels import chunk_gsa
    for name in args.shapes.split(","):
        B, T, H, D, M = SHAPES[name]
        q, k, v, s, g = make_inputs(B, T, H, D, M, torch.bfloat16)
        step = lambda: chunk_gsa(q, k, v, s, g)[0].backward(torch.ones_like(v))   # noqa: E731
        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"== shape {name} {SHAPES[name]}: per-kernel CUDA time over 5 fwd+bwd steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))
    compiled_kernel_report()


if __name__ == "__main__":
    main()
