"""The competing backend: torch.compile of the pure-PyTorch chunked form, timed per shape.

Run in a subprocess with a time limit (`--compile-timeout`, default 300 s): max-autotune compiles
of one shape took minutes, and a sweep slice must not die inside one; mode "default"
(`--compile-mode`, the sweep's default) compiles faster (~35 s for forward and backward on a CPU,
whatever T: the chunk states come from a scan of log2(#chunks) steps, not an unrolled loop). The subprocess takes gsa_kernels.torch_chunked.compiled(mode) (what chunk_gsa dispatches to
for an entry that names that mode), checks forward and gradients against the float64 reference (the
same gate as the Triton candidates), then times forward and forward+backward like the kernels.

    python -m tuning.compile_backend '{"shape": [B, T, H, K, V, M], "dtype": "bfloat16", "mode": ..., ...}'
prints one JSON line: {"fwd_ms", "fwd_bwd_ms"} or {"error"}.

Each of those subprocesses spends ~10 s importing and then compiles alone, one shape after another.
A sweep therefore compiles every shape's form first, `jobs` subprocesses at a time ("warm": compile
and run once, no check, no timing), into Inductor's and Triton's on-disk caches, which every
subprocess shares; the timed subprocess then finds its graphs compiled. A shape whose up-front compile
failed or ran past the limit is not compiled again: its entry records why (`warm_in_subprocesses`).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def _run(shape, dtype: str, settings, *, warm: bool, timeout: float | None = None) -> dict:
    """One subprocess: its JSON line, or {"error": why} (a timeout, a crash, no output); `timeout`
    shorter than --compile-timeout: a kill for lack of time adds "cut": True (no verdict on the shape)."""
    limit = settings.compile_timeout if timeout is None else min(timeout, settings.compile_timeout)
    args = json.dumps({"shape": shape.as_list(), "dtype": dtype, "warmup_ms": settings.warmup_ms,
                       "rep_ms": settings.rep_ms, "mode": settings.compile_mode, "warm": warm})
    try:
        proc = subprocess.run([sys.executable, "-m", "tuning.compile_backend", args], capture_output=True,
                              text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"not timed: compiling took over {settings.compile_timeout:.0f} s (--compile-timeout)",
                "cut": limit < settings.compile_timeout}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed (exit {proc.returncode}): {tail[:300]}"}
    return json.loads(lines[-1])


def measure_in_subprocess(shape, dtype: str, settings) -> dict:
    """{"fwd_ms", "fwd_bwd_ms"} of the compiled form at this shape, or {"error": why}; a shape whose
    up-front compile failed (settings.compile_failed) is not compiled again."""
    failed = (settings.compile_failed or {}).get((tuple(shape.as_list()), dtype))
    if failed is not None:
        return {"error": f"{failed} (the sweep's up-front compile)"}
    return _run(shape, dtype, settings, warm=False)


def warm_in_subprocesses(work, settings, jobs: int, deadline: float | None = None) -> dict:
    """Compile the form of every (shape, dtype) in `work`, `jobs` subprocesses at a time, each within
    --compile-timeout and none past `deadline` (time.monotonic()). Returns {(shape as a tuple, dtype):
    why} for those that failed; one cut or never started for lack of time is no failure (its timed
    run compiles it)."""
    def one(item):
        shape, dtype = item
        key = (tuple(shape.as_list()), dtype)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left < 1:
            return key, None
        res = _run(shape, dtype, settings, warm=True, timeout=left)
        return key, None if res.get("cut") else res.get("error")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return {key: why for key, why in pool.map(one, work) if why is not None}


def main(argv=None):
    import torch
    from gsa_kernels import torch_chunked
    from tuning import measure
    from tuning.shapes import Shape
    cfg = json.loads((argv or sys.argv[1:])[0])
    shape, dtype = Shape(*cfg["shape"]), cfg["dtype"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = measure.Inputs(shape, dtype, device)
    fn = torch_chunked.compiled(cfg["mode"])
    do = inputs.do

    def fwd(xs):
        return fn(*xs)[0]

    def fwd_bwd(xs):
        o = fwd(xs)
        return o, torch.autograd.grad(o, xs, do)

    if cfg.get("warm"):
        # the graphs the timed run calls (forward with autograd, backward), compiled into the shared
        # caches and run once; the timed run checks and times
        fwd_bwd(inputs.sets[0])
        print(json.dumps({"warm": True}))
        return
    o, grads = fwd_bwd(inputs.sets[0])
    reason = measure.check(measure.Reference(inputs), o, grads)
    if reason is not None:
        print(json.dumps({"error": f"rejected by the correctness gate: {reason}"}))
        return
    timer = measure.Timer(device, cfg["warmup_ms"], cfg["rep_ms"])
    fwd_ms = timer(measure.rotating([lambda xs=xs: fwd(xs) for xs in inputs.sets]))
    fwd_bwd_ms = timer(measure.rotating([lambda xs=xs: fwd_bwd(xs) for xs in inputs.sets]))
    print(json.dumps({"fwd_ms": round(fwd_ms, 4), "fwd_bwd_ms": round(fwd_bwd_ms, 4)}))


if __name__ == "__main__":
    main()
