"""Parallel compilation of candidate configs before they are timed (CUDA only).

Triton 3.6 compiles a kernel on its first launch, one at a time in the launching process (0.5-3 s
each for these kernels, ~10 kernels a shape): a sweep is compile-bound. Here spawned worker
processes (one CUDA context each) launch the real op once per task under `launches.override`, so
the compiled kernels land in Triton's on-disk cache (TRITON_CACHE_DIR, written atomically by
Triton) and the sweep's own first launch is a cache hit. Workers run the task's real shape: Triton
specialises integer arguments on divisibility by 16 (chunk counts, strides), so a smaller problem
would compile other variants and the sweep would compile again.

`Compiler` keeps one pool for a whole sweep (spawning a worker costs seconds: torch, Triton, a CUDA
context), and the sweep hands it every shape's start configs up front, so all shapes compile in
parallel before the first is timed. Generic: the workers only call chunk_gsa, they never see a
kernel's arguments. A task that fails in a worker is tried again by the sweep itself, which alone
decides rejections: a worker that fails for its own reasons (no CUDA context, out of memory) can
never reject a good config. `--jobs 0` turns it off (same results, slower).
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from tuning.shapes import Shape


def _task(args):
    """Run the op once under the task's configs; phase "fwd", "fwd+bwd", "infer" (a no-grad forward)
    or "all" (a no-grad forward, then forward and backward)."""
    label, cfgs, phase, shape_list, dtype = args
    import torch
    from gsa_kernels.chunk import chunk_gsa
    from gsa_kernels.launches import override
    from tuning import measure
    try:
        xs = measure.make_inputs(Shape(*shape_list), dtype, "cuda")
        with override(cfgs):
            if phase in ("infer", "all"):
                with torch.no_grad():
                    chunk_gsa(*xs)
            if phase != "infer":
                o = chunk_gsa(*xs)[0]
                if phase != "fwd":
                    torch.autograd.grad(o, xs, torch.ones_like(o))
        torch.cuda.synchronize()
        return label, None
    except Exception as e:   # reported to the sweep as this task's failure, tried again there
        text = str(e).strip().splitlines()
        return label, f"compile/launch failed: {type(e).__name__}: {text[0] if text else ''}"
    finally:
        torch.cuda.empty_cache()


class Compiler:
    """One pool of `jobs` spawned workers for as long as it is open (a `with` block)."""

    def __init__(self, jobs: int):
        os.environ.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
        self.warmed: set = set()       # (shape, dtype) whose every candidate was compiled up front

    def compile(self, tasks, shape: Shape, dtype: str) -> dict:
        """{label: error} of the tasks [(label, configs override, phase)] that failed in a worker."""
        return self.compile_many([(label, cfgs, phase, shape, dtype) for label, cfgs, phase in tasks])

    def compile_many(self, tasks) -> dict:
        """The same for tasks [(label, configs, phase, shape, dtype)] of any shapes, all in parallel."""
        work = [(label, cfgs, phase, shape.as_list(), dtype) for label, cfgs, phase, shape, dtype in tasks]
        return {label: error for label, error in self.pool.map(_task, work) if error is not None}

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
