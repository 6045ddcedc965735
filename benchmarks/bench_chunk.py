"""chunk_gsa forward and forward+backward, side by side with flash-linear-attention and SDPA, on a GPU.

    python -m benchmarks.bench_chunk [--shapes a,b,c,d] [--dtype bf16] [--no-fla] [--rounds 3] [--graph]
                                     [--levels 0,2] [--memory] [--json PATH]

Times are medians of triton.testing.do_bench after a warm-up call. With --rounds R each op is timed R
times, alternating between the implementations, and the median of the R medians is reported (FLA's
time has moved by up to 2x between runs on the same GPU: rounds show how much of that is inside one
run). --graph also times each op captured once in a CUDA graph and replayed (`cuda_graph`): device time
alone, without the host's launch cost (FLA's eager forward at shape a is mostly host time: 1.37 ms
eager, 0.54 ms from a graph, on the H100). The byte floor is the fewest bytes the op must move (read
q, k, v, s, g once and write o once; the backward adds reading do and writing every gradient), timed
at the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from benchmarks.gpu_lock import gpu_lock
from tuning.measure import cuda_graph

SHAPES = {  # [B, T, H, K=V, M]
    "a": (8, 2048, 4, 512, 64),   # the paper's 1.3B layer
    "b": (8, 2048, 16, 128, 64),
    "c": (2, 8192, 4, 512, 64),
    "d": (32, 512, 4, 256, 64),
    "e": (8, 2048, 32, 64, 64),   # many small heads: the intra-chunk (slot) work outweighs the K, V work
    "f": (1, 32768, 4, 512, 64),  # one long sequence: the state walks' serial chain is the time
    "g": (1, 65536, 4, 512, 64),  # the long-sequence rows of the two-level walk (docs/design.md)
    "h": (4, 16384, 4, 512, 64),
    # grouped query heads: H query heads over KV_HEADS kv heads (FLA repeats the kv heads in memory)
    "i": (8, 2048, 16, 128, 64),  # b with 4 kv heads
    "j": (8, 2048, 16, 512, 64),  # a's heads x 4 query heads each
}
KV_HEADS = {"i": 4, "j": 4}     # other shapes: one kv head per query head
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(B, T, H, D, M, dtype, device="cuda", requires_grad=True, seed=0, kv_heads=None):
    """q [B, T, H, D]; k, v, s, g with kv_heads heads (default H)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    Hkv = kv_heads or H
    q = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(B, T, Hkv, D, device=device, dtype=dtype, generator=gen) for _ in range(2))
    g = F.logsigmoid(torch.randn(B, T, Hkv, M, device=device, generator=gen)) / 8
    s = 1 - g.exp()
    xs = [q, k, v, s.to(dtype), g.to(dtype)]
    return [x.requires_grad_(requires_grad) for x in xs]


def copy_bandwidth(nbytes=2 << 30):
    """Device-to-device copy, bytes read plus written per second."""
    import triton
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    with gpu_lock():
        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def floor_bytes(B, T, H, D, M, dtype, backward, kv_heads=None):
    el = torch.tensor([], dtype=dtype).element_size()
    Hkv = kv_heads or H
    inputs = el * B * T * (H * D + Hkv * (2 * D + 2 * M))     # q; k, v, s, g
    fwd = inputs + el * B * T * H * D
    if not backward:
        return fwd
    return fwd + el * B * T * H * D + inputs   # read do, write 5 grads


def provider_name(level):
    """Our provider at a checkpoint level: the default (2, as FLA's) is plain "gsa_kernels"."""
    return "gsa_kernels" if level == 2 else f"gsa_kernels_level{level}"


def providers(include_fla, levels=(2,)):
    from gsa_kernels import chunk_gsa
    out = {provider_name(level): (lambda q, k, v, s, g, level=level: chunk_gsa(q, k, v, s, g,
                                                                              checkpoint_level=level)[0])
           for level in levels}
    if include_fla:
        try:
            from fla.ops.gsa import chunk_gsa as fla_chunk_gsa
            out["fla"] = lambda q, k, v, s, g: fla_chunk_gsa(q, k, v, s, g)[0]
        except Exception as e:  # the optional peer: report why it is missing, keep going
            print(f"# flash-linear-attention not available ({type(e).__name__}: {e}); skipping it",
                  file=sys.stderr)
    return out


def sdpa_inputs(B, T, H, D, dtype):
    hd = min(D, 256)                       # same hidden size H*D, in heads the attention kernels take
    heads = H * D // hd
    return [torch.randn(B, heads, T, hd, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]


def peak_memory_mib(fn, inputs, backward: bool) -> float:
    """Most memory allocated during one call (forward, or forward+backward) beyond the inputs."""
    out = fn(*inputs)
    do = torch.randn_like(out)
    del out
    for x in inputs:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if backward:
        fn(*inputs).backward(do)
    else:
        with torch.no_grad():
            fn(*inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for x in inputs:
        x.grad = None
    return peak / 2**20


def time_op(fn, inputs, backward, graph=False):
    """Median ms of one forward (no grad) or forward + backward, after a warm-up call; with graph,
    of the same work captured once in a CUDA graph and replayed."""
    import triton
    with torch.no_grad():                   # keep no autograd graph alive: a capture would sync with it
        do = torch.randn_like(fn(*inputs))
    if backward and graph:                  # gradients returned, not accumulated: nothing outside the graph
        def step():
            torch.autograd.grad(fn(*inputs), inputs, do)
    elif backward:
        def step():
            fn(*inputs).backward(do)
    else:
        def step():
            with torch.no_grad():
                fn(*inputs)
    step()                                  # warm-up: compilation and (for fla) autotuning
    torch.cuda.synchronize()
    with gpu_lock():                        # never timed while another process times (fla_cache.py)
        if graph:
            return triton.testing.do_bench(cuda_graph(step).replay, warmup=25, rep=200, return_mode="median")
        return triton.testing.do_bench(step, warmup=25, rep=200, grad_to_none=inputs, return_mode="median")


def graph_times(rows, provs, dtype):
    """Adds "<provider>_graph" times to rows. Run after every eager time: a failed capture can leave
    the CUDA context unusable, so the first failure ends the graph timings (forwards first)."""
    for row in sorted(rows, key=lambda r: r["mode"] != "fwd"):
        for pname, fn in provs.items():
            inputs = make_inputs(row["B"], row["T"], row["H"], row["D"], row["M"], dtype, kv_heads=row["H_kv"])
            try:
                row["ms"][f"{pname}_graph"] = time_op(fn, inputs, row["mode"] == "fwd+bwd", graph=True)
            except Exception as e:
                print(f"# {pname} {row['shape']} {row['mode']}: CUDA graph capture failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); no more graph times", file=sys.stderr)
                return
            del inputs
        t = row["ms"]
        print(f"{row['shape']} {row['mode']:8s} graph: " + " ".join(f"{k}={v:.3f}" for k, v in t.items()
                                                                    if k.endswith("_graph")), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="a,b,c,d")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--no-fla", action="store_true", help="leave out flash-linear-attention")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time each op this many times, alternating implementations; report the median")
    ap.add_argument("--graph", action="store_true", help="also time each op replayed from a CUDA graph")
    ap.add_argument("--levels", default="2",
                    help="our checkpoint levels to run, comma-separated (2, the default, is 'gsa_kernels')")
    ap.add_argument("--memory", action="store_true",
                    help="also the peak memory of each op beyond its inputs (MiB)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if not torch.cuda.is_available():
        sys.exit("bench_chunk needs a CUDA GPU")
    dtype = DTYPES[args.dtype]
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, copy {bw / 1e9:.0f} GB/s, {args.dtype}")
    levels = [int(x) for x in args.levels.split(",")]
    if any(level not in (0, 1, 2) for level in levels) or 2 not in levels:
        ap.error(f"--levels takes 0, 1 and 2 and must include 2 (the default call), got {args.levels}")
    provs = providers(not args.no_fla, levels)
    rows = []
    for name in args.shapes.split(","):
        B, T, H, D, M = SHAPES[name]
        Hkv = KV_HEADS.get(name, H)
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            nbytes = floor_bytes(B, T, H, D, M, dtype, backward, Hkv)
            floor_ms = nbytes / bw * 1e3
            rounds = {pname: [] for pname in provs}
            for _ in range(args.rounds):    # alternate, so that a drift of the GPU hits both alike
                for pname, fn in provs.items():
                    inputs = make_inputs(B, T, H, D, M, dtype, kv_heads=Hkv)
                    rounds[pname].append(time_op(fn, inputs, backward))
                    del inputs
            times = {pname: statistics.median(ms) for pname, ms in rounds.items()}
            if not args.no_sdpa:
                for backend, sdp in (("flash", torch.nn.attention.SDPBackend.FLASH_ATTENTION),
                                     ("cudnn", torch.nn.attention.SDPBackend.CUDNN_ATTENTION)):
                    try:
                        with torch.nn.attention.sdpa_kernel(sdp):
                            times[f"sdpa_{backend}"] = time_op(
                                lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
                                sdpa_inputs(B, T, H, D, dtype), backward)
                    except RuntimeError as e:
                        print(f"# sdpa {backend} unavailable: {str(e).splitlines()[0]}", file=sys.stderr)
            ours = times["gsa_kernels"]
            row = {"shape": name, "B": B, "T": T, "H": H, "H_kv": Hkv, "D": D, "M": M, "mode": mode,
                   "floor_ms": floor_ms, "ms": times, "rounds_ms": rounds,
                   "speedup_vs_fla": times["fla"] / ours if "fla" in times else None,
                   "ours_GBps": nbytes / (ours * 1e-3) / 1e9, "ours_x_floor": ours / floor_ms}
            if args.memory:
                row["peak_MiB"] = {}
                for pname, fn in provs.items():
                    inputs = make_inputs(B, T, H, D, M, dtype, kv_heads=Hkv)
                    row["peak_MiB"][pname] = peak_memory_mib(fn, inputs, backward)
                    del inputs
                    torch.cuda.empty_cache()
                print(f"{name} {mode:8s} peak MiB: " + " ".join(f"{p}={v:.0f}" for p, v in row["peak_MiB"].items()),
                      flush=True)
            rows.append(row)
            fla = f"{times['fla']:.3f}" if "fla" in times else "-"
            spd = f"{row['speedup_vs_fla']:.2f}x" if row["speedup_vs_fla"] else "-"
            sd = " ".join(f"{k}={v:.3f}" for k, v in times.items() if k.startswith("sdpa"))
            if args.rounds > 1:
                sd += " | rounds " + " ".join(f"{p}=" + ",".join(f"{x:.3f}" for x in ms) for p, ms in rounds.items())
            print(f"{name} {mode:8s} ours {ours:.3f} ms | fla {fla} ms | speed-up {spd} | "
                  f"{row['ours_GBps']:.0f} GB/s, {row['ours_x_floor']:.1f}x floor ({floor_ms:.3f} ms) | {sd}",
                  flush=True)
    if args.graph:
        graph_times(rows, provs, dtype)
    print("\n| shape | mode | gsa_kernels ms | fla ms | speed-up | GB/s | x floor | sdpa flash | sdpa cudnn |"
          " graph: gsa_kernels / fla |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["ms"]
        f = lambda k: f"{t[k]:.3f}" if k in t else "-"   # noqa: E731
        spd = f"{r['speedup_vs_fla']:.2f}x" if r["speedup_vs_fla"] else "-"
        print(f"| {r['shape']} | {r['mode']} | {f('gsa_kernels')} | {f('fla')} | {spd} | {r['ours_GBps']:.0f} | "
              f"{r['ours_x_floor']:.1f} | {f('sdpa_flash')} | {f('sdpa_cudnn')} | "
              f"{f('gsa_kernels_graph')} / {f('fla_graph')} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
