"""Where the time goes: per-kernel CUDA time of one chunk_gsa forward + backward, and each compiled
kernel's registers and spills; FLA's kernels alongside with --fla.
    python -m benchmarks.profile_kernels [--shapes a,b] [--levels 2,0] [--fla]"""
from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.bench_chunk import SHAPES, make_inputs
from benchmarks.gpu_lock import gpu_lock


def compiled_kernel_report():
    from gsa_kernels.kernels import chunk_bwd, chunk_fwd, cumsum, states
    fns = [cumsum.chunk_cumsum_kernel, states.states_fwd_kernel, chunk_fwd.chunk_fwd_kernel,
           chunk_bwd.chunk_bwd_dscores_kernel, states.states_bwd_kernel, chunk_bwd.chunk_bwd_keys_kernel,
           chunk_bwd.chunk_bwd_values_kernel]
    for fn in fns:
        for caches in fn.device_caches.values():
            for key, kern in caches[0].items():
                n_regs, n_spills = getattr(kern, "n_regs", "?"), getattr(kern, "n_spills", "?")
                smem = getattr(kern.metadata, "shared", "?")
                print(f"  {fn.fn.__name__:28s} regs {n_regs} spills {n_spills} smem {smem}")


STEPS = 5      # profiled steps per variant; the tables are per step


def print_last_step(prof):
    """The last step's kernels in launch order, each with its own time: a kernel launched twice in a
    step (the level-2 backward's two reverse walks) shows as two rows, and the order shows the chain."""
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    per_step = len(kernels) // STEPS
    print("  the last step's kernels in order:")
    for e in kernels[len(kernels) - per_step:]:
        print(f"    {e.time_range.elapsed_us() / 1e3:8.3f} ms  {e.name[:60]}")


def profiled(step):
    step()                     # compilation, autotuning
    torch.cuda.synchronize()
    with gpu_lock(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    return prof


def report(title, prof):
    print(f"== {title}: per-kernel CUDA time, per fwd+bwd step")
    rows = [(e.key, e.device_time_total / (STEPS * 1e3)) for e in prof.key_averages() if e.device_time_total > 0]
    for key, ms in sorted(rows, key=lambda r: -r[1])[:12]:
        print(f"  {ms:8.3f} ms  {key[:60]}")
    print(f"  {sum(ms for _, ms in rows):8.3f} ms  in all")
    print_last_step(prof)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="a,b")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--chunk-sizes", default="0", help="0: the default chunk size")
    ap.add_argument("--levels", default="2", help="checkpoint levels to profile, e.g. 2,0")
    ap.add_argument("--fla", action="store_true", help="also profile flash-linear-attention's chunk_gsa")
    ap.add_argument("--states", default="",
                    help="state-walk configs to compare, TILE:WARPS:STAGES[:SPLIT],... (both walks, BK = BV = "
                         "TILE; SPLIT 0 paired, 1 one program per tile, default 0); empty: the default lookup")
    args = ap.parse_args(argv)
    from gsa_kernels import chunk_gsa
    from gsa_kernels.launches import last_launches, override
    variants = [None] + [(tuple(map(int, v.split(":"))) + (0,))[:4] for v in args.states.split(",") if v]
    for name in args.shapes.split(","):
        B, T, H, D, M = SHAPES[name]
        inputs = make_inputs(B, T, H, D, M, torch.bfloat16)
        do = torch.ones_like(inputs[2])
        # autograd.grad, not .backward(): no .grad accumulation kernels in the profile
        grads = lambda o: torch.autograd.grad(o, inputs, do)   # noqa: E731
        for BT, variant, level in itertools.product(map(int, args.chunk_sizes.split(",")), variants,
                                                    map(int, args.levels.split(","))):
            step = lambda: grads(chunk_gsa(*inputs, chunk_size=BT or None, checkpoint_level=level)[0])   # noqa: E731
            # an empty override still pins chunk_gsa to the Triton kernels (no backend dispatch)
            walk = {} if variant is None else {
                kern: {"BK": variant[0], "BV": variant[0], "SPLIT": variant[3], "num_warps": variant[1],
                       "num_stages": variant[2]}
                for kern in ("states_fwd", "states_bwd")}
            with override(walk):
                prof = profiled(step)
            report(f"shape {name} {SHAPES[name]}, level {level}, chunk {BT}, state walks {variant or 'default'}",
                   prof)
            for kern, rec in last_launches().items():
                if kern.startswith("states"):
                    print(f"  {kern}: {rec['config']} ({rec['source']})")
        if args.fla:
            from fla.ops.gsa import chunk_gsa as fla_chunk_gsa
            report(f"shape {name} {SHAPES[name]}, FLA 0.6.0 (its default checkpoint level 2)",
                   profiled(lambda: grads(fla_chunk_gsa(*inputs)[0])))
    compiled_kernel_report()


if __name__ == "__main__":
    main()
