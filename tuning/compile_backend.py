"""The competing backend: torch.compile of the pure-PyTorch chunked form, timed per shape.

Run in a subprocess with a time limit (`--compile-timeout`, default 300 s): the chunk loop of
chunk_gsa_torch unrolls, so max-autotune compilation of a long sequence can take minutes, and a
sweep slice must not die inside it; mode "default" (`--compile-mode`, the sweep's default) compiles
faster. The subprocess takes gsa_kernels.torch_chunked.compiled(mode) (what chunk_gsa dispatches to
for an entry that names that mode), checks forward and gradients against the float64 reference (the
same gate as the Triton candidates), then times forward and forward+backward like the kernels.

    python -m tuning.compile_backend '{"shape": [B, T, H, K, V, M], "dtype": "bfloat16", "mode": ..., ...}'
prints one JSON line: {"fwd_ms", "fwd_bwd_ms"} or {"error"}.
"""
from __future__ import annotations

import json
import subprocess
import sys


def measure_in_subprocess(shape, dtype: str, settings) -> dict:
    args = json.dumps({"shape": shape.as_list(), "dtype": dtype, "warmup_ms": settings.warmup_ms,
                       "rep_ms": settings.rep_ms, "mode": settings.compile_mode})
    try:
        proc = subprocess.run([sys.executable, "-m", "tuning.compile_backend", args], capture_output=True,
                              text=True, timeout=settings.compile_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not timed: compiling took over {settings.compile_timeout:.0f} s (--compile-timeout)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed (exit {proc.returncode}): {tail[:300]}"}
    return json.loads(lines[-1])


def main(argv=None):
    import torch
    from gsa_kernels import torch_chunked
    from tuning import measure
    from tuning.shapes import Shape
    cfg = json.loads((argv or sys.argv[1:])[0])
    shape, dtype = Shape(*cfg["shape"]), cfg["dtype"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = measure.Inputs(shape, dtype, device)
    ref = measure.Reference(inputs)
    fn = torch_chunked.compiled(cfg["mode"])
    do = inputs.do

    def fwd(xs):
        return fn(*xs)[0]

    def fwd_bwd(xs):
        o = fwd(xs)
        return o, torch.autograd.grad(o, xs, do)

    o, grads = fwd_bwd(inputs.sets[0])
    reason = measure.check(ref, o, grads)
    if reason is not None:
        print(json.dumps({"error": f"rejected by the correctness gate: {reason}"}))
        return
    timer = measure.Timer(device, cfg["warmup_ms"], cfg["rep_ms"])
    fwd_ms = timer(measure.rotating([lambda xs=xs: fwd(xs) for xs in inputs.sets]))
    fwd_bwd_ms = timer(measure.rotating([lambda xs=xs: fwd_bwd(xs) for xs in inputs.sets]))
    print(json.dumps({"fwd_ms": round(fwd_ms, 4), "fwd_bwd_ms": round(fwd_bwd_ms, 4)}))


if __name__ == "__main__":
    main()
