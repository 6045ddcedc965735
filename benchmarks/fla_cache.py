"""flash-linear-attention's autotuning, paid once and carried between GPU calls.

FLA autotunes every kernel on its first call per shape (over 400 s for shape a's forward+backward on
an H100), longer than one 10-minute device call allows for four shapes. Triton can keep autotune
results on disk (TRITON_CACHE_AUTOTUNING=1): this script warms them and packs only the small
`*.autotune.json` files, so a later call restores them and FLA runs its tuned configs at once (it
still compiles the winners).

    python -m benchmarks.fla_cache warm --shapes a,b,c,d --jobs 4 --pack $OUT/fla_autotune.tgz
    python -m benchmarks.fla_cache restore .fla_cache/fla_autotune.tgz
    python -m benchmarks.fla_cache pack $OUT/fla_autotune.tgz     # whatever the cache holds now

Fairness: shapes are warmed in parallel processes to overlap FLA's compile time (single-threaded, the
bulk of its cost), but every autotune *timing* holds a machine-wide file lock, so no two of FLA's
benchmarks share the GPU and its picks are the ones a lone process would make. Nothing else should
run on the GPU during a warm-up. Both commands need TRITON_CACHE_DIR and TRITON_CACHE_AUTOTUNING=1
in the environment, the same in the later benchmark call.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.gpu_lock import gpu_lock

def _cache_dir() -> Path:
    d = os.environ.get("TRITON_CACHE_DIR")
    if not d or os.environ.get("TRITON_CACHE_AUTOTUNING") != "1":
        sys.exit("set TRITON_CACHE_DIR and TRITON_CACHE_AUTOTUNING=1 (the same in the benchmark call)")
    return Path(d)


def install_locked_benchmarker():
    """Make every Triton autotune timing hold LOCK; the first run (the compile) happens outside it."""
    import torch
    import triton
    from triton.runtime import driver

    def locked_do_bench(fn, *args, **kwargs):
        fn()                                   # compile (and run once) without holding the GPU lock
        torch.cuda.synchronize()
        with gpu_lock():
            return triton.testing.do_bench(fn, *args, **kwargs)

    driver.active.get_benchmarker = lambda: locked_do_bench


def warm_one(shape: str, dtype: str):
    """One FLA forward and one forward+backward at `shape`, called as bench_chunk calls them."""
    install_locked_benchmarker()
    import torch

    from benchmarks.bench_chunk import DTYPES, KV_HEADS, SHAPES, make_inputs
    from fla.ops.gsa import chunk_gsa as fla_chunk_gsa
    B, T, H, D, M = SHAPES[shape]
    t0 = time.time()
    q, k, v, s, g = make_inputs(B, T, H, D, M, DTYPES[dtype], kv_heads=KV_HEADS.get(shape))
    with torch.no_grad():
        fla_chunk_gsa(q, k, v, s, g)
    torch.cuda.synchronize()
    t1 = time.time()
    o = fla_chunk_gsa(q, k, v, s, g)[0]
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()
    print(f"fla warm {shape}: forward {t1 - t0:.0f} s, then forward+backward {time.time() - t1:.0f} s", flush=True)


def pack(cache: Path, target: Path):
    files = sorted(cache.rglob("*.autotune.json"))
    tmp = target.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=str(f.relative_to(cache)))
    os.replace(tmp, target)
    return len(files)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("warm")
    w.add_argument("--shapes", default="a,b,c,d")
    w.add_argument("--dtype", default="bf16")
    w.add_argument("--jobs", type=int, default=4)
    w.add_argument("--pack", required=True, help="tar.gz of the autotune results, rewritten every minute")
    one = sub.add_parser("one")
    one.add_argument("shape")
    one.add_argument("--dtype", default="bf16")
    r = sub.add_parser("restore")
    r.add_argument("archive")
    pk = sub.add_parser("pack")
    pk.add_argument("archive")
    args = ap.parse_args(argv)
    cache = _cache_dir()
    if args.cmd == "one":
        warm_one(args.shape, args.dtype)
    elif args.cmd == "pack":
        print(f"packed {pack(cache, Path(args.archive))} autotune results")
    elif args.cmd == "restore":
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.archive) as tar:
            tar.extractall(cache, filter="data")
        print(f"restored {len(list(cache.rglob('*.autotune.json')))} autotune results into {cache}")
    else:
        pending = args.shapes.split(",")
        running: list[subprocess.Popen] = []
        target = Path(args.pack)
        while pending or running:
            while pending and len(running) < args.jobs:
                running.append(subprocess.Popen([sys.executable, "-m", "benchmarks.fla_cache", "one",
                                                 pending.pop(0), "--dtype", args.dtype]))
            time.sleep(30)
            running = [p for p in running if p.poll() is None]
            print(f"packed {pack(cache, target)} autotune results ({len(running)} shapes still tuning)", flush=True)


if __name__ == "__main__":
    main()
