"""The decode step (T = 1 with a state), side by side with flash-linear-attention, eager and in a CUDA
graph, against the floor of reading and writing the float32 state once; plus GSAModel generation.

    python -m benchmarks.bench_decode [--batches 1,8,64] [--no-fla] [--sweep] [--host] [--no-generate] [--json PATH]

Shape: the paper's layer, H = 4, K = V = 512, M = 64, bf16 inputs, float32 state [B, 4, 512, 64] +
[B, 4, 64, 512]. "eager" is one call of the public function per step (Python wrapper included),
timed over calls issued back to back (`bench_eager`: what a loop of eager steps gets, host time
included); "graph" the same call captured once in a CUDA graph and replayed (the kernels plus one
graph launch); "graph8" eight such steps on eight states (a model's layers) in one graph, per step:
the kernels without the graph launch, what a graphed model step pays per layer. Graph times are
medians of triton.testing.do_bench. do_bench is no measure of an eager step: it clears the L2
cache before every call, a ~0.1 ms kernel behind which the host prepares the call, so a step bound
by the host (~70 us) read as ~30 us there. The floor is 2 x the state bytes at the copy bandwidth measured
in the same run. --sweep also times every decode config candidate
(candidates.RECURRENT_CANDIDATES["decode"]) in a graph, checked against the default's output, to pick
the defaults from.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.bench_chunk import copy_bandwidth
from tuning.measure import cuda_graph

H, K, V, M = 4, 512, 512, 64


def make_step_inputs(B, dtype=torch.bfloat16, seed=0, group=1):
    """One step's inputs; group > 1: q with H * group heads over the H kv heads (GQA)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, 1, H * group, K, device="cuda", dtype=dtype, generator=gen)
    k, v = (torch.randn(B, 1, H, D, device="cuda", dtype=dtype, generator=gen) for D in (K, V))
    g = F.logsigmoid(torch.randn(B, 1, H, M, device="cuda", generator=gen)) / 8
    s = 1 - g.exp()
    hk = torch.randn(B, H, K, M, device="cuda", generator=gen)
    hv = torch.randn(B, H, M, V, device="cuda", generator=gen)
    return [q, k, v, s.to(dtype), g.to(dtype)], (hk, hv)


def bench(fn, rep=300):
    import triton
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def bench_eager(fn, calls=200, repeats=5):
    """ms per call: `calls` calls back to back, then a sync; the median of `repeats` such runs.
    The GPU and the host overlap as in a loop of eager steps, so this is the slower of the two."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - t0) / calls * 1e3)
    return sorted(runs)[len(runs) // 2]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def providers(include_fla):
    from gsa_kernels import fused_recurrent_gsa
    out = {"gsa_kernels": fused_recurrent_gsa}
    if include_fla:
        try:
            from fla.ops.gsa import fused_recurrent_gsa as fla_fused_recurrent_gsa
            out["fla"] = fla_fused_recurrent_gsa
        except Exception as e:  # the optional peer: report why it is missing, keep going
            print(f"# flash-linear-attention not available ({type(e).__name__}: {e}); skipping it",
                  file=sys.stderr)
    return out


LAYERS = 8      # steps in one graph for "graph8"


def time_decode(B, provs, group=1):
    """{provider: {"eager": ms, "graph": ms, "graph8": ms}} for one decode step at batch B, plus the
    out= variant (eager and graph)."""
    from gsa_kernels import fused_recurrent_gsa
    xs, (hk, hv) = make_step_inputs(B, group=group)
    times, outputs = {}, {}
    with torch.no_grad():
        for name, fn in provs.items():
            state = (hk.clone(), hv.clone())     # FLA's older decode kernels write into the state
            step = lambda: fn(*xs, initial_state=state, output_final_state=True)   # noqa: E731
            o, (hk1, hv1) = step()
            outputs[name] = (o, hk1, hv1)
            times[name] = {"eager": bench_eager(step), "graph": bench(cuda_graph(step).replay)}
            states = [(hk.clone(), hv.clone()) for _ in range(LAYERS)]

            def layers(fn=fn, states=states):
                for st in states:
                    fn(*xs, initial_state=st, output_final_state=True)
            times[name]["graph8"] = bench(cuda_graph(layers).replay) / LAYERS
            del states
        bufs = (torch.empty_like(hk), torch.empty_like(hv))
        step = lambda: fused_recurrent_gsa(*xs, initial_state=(hk, hv), out=bufs)   # noqa: E731
        times["gsa_kernels_out"] = {"eager": bench_eager(step), "graph": bench(cuda_graph(step).replay)}
    agree = None
    if "fla" in outputs:
        a, b = outputs["gsa_kernels"], outputs["fla"]
        agree = {"o": rel(a[0], b[0]), "hk": rel(a[1], b[1]), "hv": rel(a[2], b[2])}
    return times, agree


def sweep_decode(B, bw):
    """Every decode candidate config in a CUDA graph; output checked against the default config."""
    from gsa_kernels.candidates import RECURRENT_CANDIDATES as CANDIDATES
    from gsa_kernels.configs import launch_config
    from gsa_kernels.launchers.recurrent import decode_step
    xs, (hk, hv) = make_step_inputs(B)
    cand = CANDIDATES["decode"]
    default = launch_config("decode", K=K, V=V, M=M, dtype=torch.bfloat16, seqs=B * H)
    out = torch.empty_like(hk), torch.empty_like(hv)
    with torch.no_grad():
        ref_o = decode_step(*xs, K ** -0.5, hk, hv, *out, config=default)
        ref = (ref_o, out[0].clone(), out[1].clone())
        rows = []
        for BK, BV, warps, pdl in itertools.product(cand["BK"], cand["BV"], cand["num_warps"], cand["PDL"]):
            if BK != BV:    # 32 configs: about a minute to compile
                continue
            cfg = {"BK": BK, "BV": BV, "num_warps": warps, "PDL": pdl}
            step = lambda: decode_step(*xs, K ** -0.5, hk, hv, *out, config=cfg)   # noqa: E731
            try:
                ms = bench(cuda_graph(step).replay, rep=100)
            except Exception as e:   # a config the compiler rejects (resources): report, go on
                print(f"#   {cfg}: failed ({type(e).__name__})", file=sys.stderr)
                continue
            o = step()
            err = max(rel(o, ref[0]), rel(out[0], ref[1]), rel(out[1], ref[2]))
            rows.append({"config": cfg, "ms": ms, "max_rel_diff_vs_default": err})
    rows.sort(key=lambda r: r["ms"])
    state_bytes = 2 * 4 * B * H * (K * M + M * V)
    print(f"  sweep B={B}: default {default} | best 5 (graph ms, x floor):")
    for r in rows[:5]:
        print(f"    {r['ms'] * 1e3:7.1f} us  {r['ms'] / (state_bytes / bw * 1e3):5.2f}x  {r['config']}  "
              f"diff {r['max_rel_diff_vs_default']:.1e}")
    return rows


def host_breakdown(B, n=3000):
    """Where the eager step's host time goes: per call, in a loop the GPU keeps up with (us)."""
    from gsa_kernels import fused_recurrent_gsa
    from gsa_kernels.checks import check_inputs
    from gsa_kernels.launchers.recurrent import decode_step
    from gsa_kernels.configs import launch_config
    from gsa_kernels.intmath import cdiv, next_pow2
    from gsa_kernels.launchers import recurrent as launchers
    from gsa_kernels.launchers.direct import DirectLaunch
    direct_values = DirectLaunch(launchers.decode_values_kernel)
    xs, (hk, hv) = make_step_inputs(B)
    out = torch.empty_like(hk), torch.empty_like(hv)
    scale = K ** -0.5
    # one launch of the values' kernel alone: what a launch costs the host
    cfg = launch_config("decode", K=K, V=V, M=M, dtype=torch.bfloat16, seqs=B * H)
    nkt = cdiv(K, cfg["BK"])
    zpart = torch.zeros(nkt, B * H, 1, next_pow2(M), device="cuda")
    o = torch.empty(B, 1, H, V, dtype=torch.bfloat16, device="cuda")
    args = (xs[2], xs[3], xs[4], hv, o, out[1], zpart, xs[0], xs[0], scale)
    kw = dict(H=H, G=1, GP=1, M=M, BM=next_pow2(M), USE_INITIAL_STATE=True, STORE_STATE=True, POOLED=False,
              PDL=False, num_warps=cfg["num_warps"], V=V, NKT=nkt, NKTP=next_pow2(nkt), BV=cfg["BV"])
    grid = (cdiv(V, cfg["BV"]), B * H)
    parts = {
        "one launch of decode_values_kernel": lambda: launchers.decode_values_kernel[grid](*args, **kw),
        "one direct launch of it (launchers/direct.py)": lambda: direct_values(grid, *args, **kw),
        "fused_recurrent_gsa": lambda: fused_recurrent_gsa(*xs, initial_state=(hk, hv), output_final_state=True),
        "fused_recurrent_gsa out=": lambda: fused_recurrent_gsa(*xs, initial_state=(hk, hv), out=out),
        "check_inputs": lambda: check_inputs(*xs, scale, (hk, hv), None, bf16_dots=False),
        "decode_step (2 launches + 2 allocations)": lambda: decode_step(*xs, scale, hk, hv, *out),
        "torch.empty": lambda: torch.empty(B, 1, H, V, dtype=torch.bfloat16, device="cuda"),
    }
    result = {}
    with torch.no_grad():
        for name, fn in parts.items():
            result[name] = bench_eager(fn, calls=n, repeats=1) * 1e3
            print(f"  host B={B}: {name:42s} {result[name]:7.1f} us per call", flush=True)
    return result


def time_generate(B, L=4, prompt=128, new=64, vocab=32000, dtype=torch.bfloat16, cuda_graphs=True):
    """GSAModel (hidden 2048, 4 heads, 64 slots, L layers) generation: decode tokens/s (prefill excluded),
    each step replayed from a CUDA graph (layers/generation.py) or run eagerly."""
    from gsa_kernels.layers import GSAModel
    torch.manual_seed(0)
    model = GSAModel(vocab, hidden_size=2048, num_layers=L, num_heads=4, num_slots=64).to("cuda", dtype).eval()
    ids = torch.randint(0, vocab, (B, prompt), device="cuda")
    model.generate(ids, 4, cuda_graphs=cuda_graphs)     # warm-up: compile every kernel, capture the graph
    torch.cuda.synchronize()

    def wall(n):
        t0 = time.perf_counter()
        model.generate(ids, n, cuda_graphs=cuda_graphs)
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    prefill = min(wall(1) for _ in range(3))        # the prefill and the first token (no decode step)
    total = min(wall(new + 1) for _ in range(3))
    decode_s = total - prefill
    return {"B": B, "layers": L, "prompt": prompt, "new_tokens": new, "cuda_graphs": cuda_graphs,
            "prefill_s": prefill, "decode_s": decode_s, "tokens_per_s": B * new / decode_s,
            "ms_per_step": decode_s / new * 1e3}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--no-fla", action="store_true", help="leave out flash-linear-attention")
    ap.add_argument("--sweep", action="store_true", help="also time every decode config candidate")
    ap.add_argument("--no-generate", action="store_true", help="skip the GSAModel generation figure")
    ap.add_argument("--host", action="store_true", help="also break the eager step's host time down")
    ap.add_argument("--group", type=int, default=1,
                    help="query heads per kv head (GQA: q has H * group heads; the state stays per kv head)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_decode needs a CUDA GPU")
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, copy {bw / 1e9:.0f} GB/s, "
          f"H={H} K={K} V={V} M={M}, query heads {H * args.group}, bf16 inputs, float32 state")
    provs = providers(not args.no_fla)
    rows, sweeps, generation, host = [], {}, [], {}
    for B in map(int, args.batches.split(",")):
        state_bytes = 2 * 4 * B * H * (K * M + M * V)     # read + write the float32 state once
        floor_ms = state_bytes / bw * 1e3
        times, agree = time_decode(B, provs, args.group)
        row = {"B": B, "floor_ms": floor_ms, "ms": times, "agreement_with_fla": agree}
        for mode in ("eager", "graph"):
            if "fla" in times:
                row[f"speedup_vs_fla_{mode}"] = times["fla"][mode] / times["gsa_kernels"][mode]
        rows.append(row)
        us = lambda name, mode: f"{times[name][mode] * 1e3:7.1f}" if name in times else "      -"   # noqa: E731
        print(f"B={B:3d} floor {floor_ms * 1e3:6.1f} us | eager: ours {us('gsa_kernels', 'eager')} us, out= "
              f"{us('gsa_kernels_out', 'eager')} us, fla {us('fla', 'eager')} us | graph: ours "
              f"{us('gsa_kernels', 'graph')} us ({times['gsa_kernels']['graph'] / floor_ms:.2f}x floor), out= "
              f"{us('gsa_kernels_out', 'graph')} us, fla {us('fla', 'graph')} us | graph8 per step: ours "
              f"{us('gsa_kernels', 'graph8')} us ({times['gsa_kernels']['graph8'] / floor_ms:.2f}x floor), fla "
              f"{us('fla', 'graph8')} us"
              + (f" | vs fla: o {agree['o']:.1e} hk {agree['hk']:.1e} hv {agree['hv']:.1e}" if agree else ""),
              flush=True)
        if args.sweep:
            sweeps[B] = sweep_decode(B, bw)
        if args.host:
            host[B] = host_breakdown(B)
    print("\n| B | floor us | ours eager us | fla eager us | ours graph us | fla graph us | ours graph x floor | "
          "speed-up graph | ours graph8 us | fla graph8 us |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["ms"]
        f = lambda name, mode: f"{t[name][mode] * 1e3:.1f}" if name in t else "-"   # noqa: E731
        spd = f"{r['speedup_vs_fla_graph']:.2f}x" if "speedup_vs_fla_graph" in r else "-"
        print(f"| {r['B']} | {r['floor_ms'] * 1e3:.1f} | {f('gsa_kernels', 'eager')} | {f('fla', 'eager')} | "
              f"{f('gsa_kernels', 'graph')} | {f('fla', 'graph')} | {t['gsa_kernels']['graph'] / r['floor_ms']:.2f} | {spd} | "
              f"{f('gsa_kernels', 'graph8')} | {f('fla', 'graph8')} |")
    if not args.no_generate:
        print("\n# GSAModel generate (hidden 2048, 4 heads, 64 slots, 4 layers, bf16, prompt 128, 64 new tokens)")
        for B in map(int, args.batches.split(",")):
            for graphs in (True, False):
                r = time_generate(B, cuda_graphs=graphs)
                generation.append(r)
                print(f"B={B:3d} {'CUDA graphs' if graphs else 'eager      '}: {r['tokens_per_s']:9.0f} tokens/s, "
                      f"{r['ms_per_step']:.3f} ms per step (prefill {r['prefill_s'] * 1e3:.1f} ms)", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9, "group": args.group, "rows": rows,
                       "sweeps": {str(b): r for b, r in sweeps.items()}, "generate": generation,
                       "host_us": {str(b): r for b, r in host.items()}}, fh, indent=1)


if __name__ == "__main__":
    main()
