"""Parallel compilation of candidate configs before they are timed (CUDA only).

Triton 3.6 compiles a kernel on its first launch, one at a time in the launching process (0.5-3 s
each for these kernels). Here worker processes (spawned, one CUDA context each) launch the real op
once per candidate on a small problem with the same compile-time constants (H, K, V, M, dtype, the
config; T only enters through Triton's divisibility-by-16 specialisation, which the small T keeps),
so the compiled kernels land in Triton's on-disk cache (TRITON_CACHE_DIR, written atomically by
Triton) and the sweep's own first launch is a cache hit. Generic: the workers only call chunk_gsa
under `launches.override`, they never see a kernel's arguments. A candidate that fails to compile in a
worker is still tried by the sweep itself, which alone decides rejections: a worker that fails for
its own reasons (no CUDA context, out of memory) can never reject a good config. Whether it pays off depends on
the CPU count and on how much of the compile holds the GIL; `--jobs 0` turns it off (same results).
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from tuning.shapes import Shape


def _small(shape: Shape) -> Shape:
    T = shape.T if shape.T <= 256 else (256 if shape.T % 16 == 0 else 255)
    return Shape(1, T, shape.H, shape.K, shape.V, shape.M)


def _task(args):
    label, cfgs, phase, shape_list, dtype = args
    import torch
    from gsa_kernels.chunk import chunk_gsa
    from gsa_kernels.launches import override
    from tuning import measure
    try:
        xs = measure.make_inputs(Shape(*shape_list), dtype, "cuda")
        with override(cfgs):
            if phase == "infer":
                with torch.no_grad():
                    chunk_gsa(*xs)
            else:
                o = chunk_gsa(*xs)[0]
                if phase != "fwd":
                    torch.autograd.grad(o, xs, torch.ones_like(o))
        torch.cuda.synchronize()
        return label, None
    except Exception as e:   # reported to the sweep as this candidate's rejection
        text = str(e).strip().splitlines()
        return label, f"compile/launch failed: {type(e).__name__}: {text[0] if text else ''}"


def compile_all(tasks, shape: Shape, dtype: str, jobs: int) -> dict:
    """{label: error} for the tasks [(label, configs override, phase)] that failed in a worker."""
    small = _small(shape).as_list()
    ctx = multiprocessing.get_context("spawn")
    os.environ.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    failed = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for label, error in pool.map(_task, [(label, cfgs, phase, small, dtype) for label, cfgs, phase in tasks]):
            if error is not None:
                failed[label] = error
    return failed
