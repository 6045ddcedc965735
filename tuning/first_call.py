"""Seconds to the first chunk_gsa forward+backward in a fresh process with an empty Triton cache.

    python -m tuning.first_call [--shape a] [--modes yaml,autotune,default,fla] [--timeout 560] [--json PATH]

Each mode runs in its own fresh Python process with empty TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR
and gsa_kernels user cache (temporary folders), bf16 inputs of the benchmark shape (a = [8, 2048, 4,
512, 64]), and reports: process_s (process start to the first result, imports included),
first_call_s (inputs ready to the first result: compilation + any autotuning + the run),
second_call_s (the same call again: the run alone), and for gsa_kernels the autotune benchmarks run
and where each launch's config came from.

    yaml      the shipped tuned_configs/<arch>.yaml, opt-in autotuning off: compile time alone
    autotune  no tuned file (GSA_KERNELS_TUNED_CONFIGS=none), GSA_KERNELS_AUTOTUNE=1: the run-time tuner
    default   no tuned file, no autotuning: the default configs' compile time
    fla       flash-linear-attention's chunk_gsa (fla.ops.gsa), its own autotuning, if importable

A mode that exceeds --timeout is killed and reported as "over N s".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

T_START = time.perf_counter()

SHAPES = {"a": (8, 2048, 4, 512, 512, 64), "b": (8, 2048, 16, 128, 128, 64),
          "c": (2, 8192, 4, 512, 512, 64), "d": (32, 512, 4, 256, 256, 64)}


def child(mode: str, shape: str):
    import warnings
    warnings.simplefilter("always")
    import torch
    import torch.nn.functional as F
    B, T, H, K, V, M = SHAPES[shape]
    if mode == "fla":
        from fla.ops.gsa import chunk_gsa
    else:
        from gsa_kernels import chunk_gsa
    if mode == "autotune":
        # a checkout has no installed entry point that would lead gsa_kernels to the search
        import tuning.autotuner  # noqa: F401
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(B, T, H, K, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", generator=gen, dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(B, T, H, M, device="cuda", generator=gen)) / 8
    s = 1 - g.exp()
    xs = [x.requires_grad_() for x in (q, k, v, s.bfloat16(), g.bfloat16())]
    do = torch.randn(B, T, H, V, device="cuda", generator=gen, dtype=torch.bfloat16)
    torch.cuda.synchronize()

    def call():
        t0 = time.perf_counter()
        o = chunk_gsa(*xs)[0]
        torch.autograd.grad(o, xs, do)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    t_ready = time.perf_counter()
    first = call()
    out = {"mode": mode, "shape": shape, "process_s": round(time.perf_counter() - T_START, 2),
           "imports_and_inputs_s": round(t_ready - T_START, 2), "first_call_s": round(first, 2),
           "second_call_s": round(call(), 4), "gpu": torch.cuda.get_device_name()}
    if mode != "fla":
        from gsa_kernels import launches, tuned_file
        out["autotune_benchmarks"] = launches.stats()["autotune_benchmarks"]
        out["config_sources"] = sorted({i["source"] for i in launches.last_launches().values()})
        out["tuned_files"] = [str(p) for p in (tuned_file.device_file_path(), tuned_file.tuned_file_path())
                              if p is not None]
    print("RESULT " + json.dumps(out), flush=True)


def run_mode(mode: str, shape: str, timeout: float) -> dict:
    tmp = tempfile.mkdtemp(prefix=f"gsa-first-call-{mode}-")
    env = {**os.environ, "TRITON_CACHE_DIR": os.path.join(tmp, "triton"),
           "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "inductor"),
           "GSA_KERNELS_CACHE_DIR": os.path.join(tmp, "gsa"), "PYTHONUNBUFFERED": "1"}
    env.pop("GSA_KERNELS_AUTOTUNE", None)
    env.pop("GSA_KERNELS_TUNED_CONFIGS", None)
    env.pop("GSA_TUNED_CONFIGS", None)        # the deprecated name, which would still be read
    if mode in ("autotune", "default"):
        env["GSA_KERNELS_TUNED_CONFIGS"] = "none"
    if mode == "autotune":
        env["GSA_KERNELS_AUTOTUNE"] = "1"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "tuning.first_call", "--child", mode, "--shape", shape],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "shape": shape, "error": f"over {timeout:.0f} s (killed)"}
    lines = [ln[len("RESULT "):] for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return {"mode": mode, "shape": shape, "error": f"exit {proc.returncode}: {tail}",
                "wall_s": round(time.perf_counter() - t0, 1)}
    res = json.loads(lines[-1])
    warns = [ln for ln in proc.stderr.splitlines() if "Warning" in ln]
    if warns:
        res["warnings"] = warns[:5]
    return res


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tuning.first_call", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="a", choices=sorted(SHAPES))
    p.add_argument("--modes", default="yaml,autotune,fla")
    p.add_argument("--timeout", type=float, default=560.0, help="seconds per mode before it is killed")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.shape)
        return 0
    modes = [m.strip() for m in args.modes.split(",")]
    bad = [m for m in modes if m not in ("yaml", "autotune", "default", "fla")]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from yaml, autotune, default, fla")
    if "fla" in modes:
        try:
            import fla.ops.gsa  # noqa: F401
        except Exception as e:   # the optional peer
            print(f"# flash-linear-attention not importable ({type(e).__name__}: {e}); skipping fla", file=sys.stderr)
            modes.remove("fla")
    results = []
    for mode in modes:
        res = run_mode(mode, args.shape, args.timeout)
        results.append(res)
        print(json.dumps(res), flush=True)
    print("\nmode      first call (s)  process (s)  steady fwd+bwd (s)  autotune benchmarks  config sources")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<9} {r['error']}")
            continue
        print(f"{r['mode']:<9} {r['first_call_s']:>14}  {r['process_s']:>11}  {r['second_call_s']:>18}  "
              f"{str(r.get('autotune_benchmarks', '-')):>19}  {','.join(r.get('config_sources', ['-']))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
