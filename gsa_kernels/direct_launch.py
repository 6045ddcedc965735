"""Launching a Triton kernel straight from its compiled binary: the eager decode step's host time.

`kernel[grid](*args)` binds and specializes every argument on every call. For the decode step's two
kernels that took about 27 us of host time per launch on the H200's host (`bench_decode --host`:
62-68 us for the launcher with its two launches and two allocations), several times the kernels' own
GPU time at small batch. `DirectKernel` keeps the compiled kernel of each specialization and, from
the second call on, hands the arguments to its launcher directly.

The cache key holds everything Triton 3.6 specializes a compiled kernel on: the constexpr values,
each tensor's dtype and 16-byte alignment, each runtime integer's class (1, a multiple of 16, other;
32- or 64-bit), the launch options (num_warps, num_stages) and the current device. Anything else (a
None, another type) takes the regular launch, as do Triton's interpreter and launches with
launch hooks set (profilers). If the direct call is refused (a launcher signature that differs in
another Triton version), the regular launch is used for good: never an error of ours.
"""
from __future__ import annotations

import os

import torch
import triton

_direct_ok = True


def _raw_stream(device: int) -> int:
    return torch.cuda.current_stream(device).cuda_stream


try:   # the stream handle without building a Stream object (what torch's compiled code uses)
    from torch._C import _cuda_getCurrentRawStream as _raw_stream   # noqa: F811
except ImportError:
    pass


def _hooks_set() -> bool:
    """Launch hooks (profilers such as Triton's proton) registered: they need the regular launch.
    Triton 3.6 keeps them in chains that are empty when unused; older versions use None."""
    runtime = triton.knobs.runtime
    return any(h is not None and getattr(h, "calls", True) for h in (runtime.launch_enter_hook, runtime.launch_exit_hook))


def _spec(value):
    """What Triton specializes a runtime argument on; None for a value only the regular path takes."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", value
    if isinstance(value, int):
        return "i", value == 1, value % 16 == 0, -2**31 <= value < 2**31
    if isinstance(value, float):
        return "f"
    return None


class DirectKernel:
    """A @triton.jit kernel launched as `kernel[grid](*args, **constexprs_and_options)`, the first
    launch of each specialization through Triton, the next ones through its compiled launcher."""

    def __init__(self, fn):
        self.fn = fn
        self.names = fn.arg_names
        # the interpreter's kernels have no params: they always take the regular path
        self.constexpr = [p.is_constexpr for p in getattr(fn, "params", [])]
        self.compiled: dict = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(tuple(grid) + (1, 1), args, kwargs)

    def _launch(self, grid, args, kwargs):
        global _direct_ok
        if (not _direct_ok or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
                or _hooks_set()):
            return self.fn[grid[:3]](*args, **kwargs)
        try:
            values = list(args) + [kwargs[name] for name in self.names[len(args):]]
        except KeyError:      # an argument left to its default: the regular path knows it
            return self.fn[grid[:3]](*args, **kwargs)
        spec = []
        for value, is_constexpr in zip(values, self.constexpr):
            s = value if is_constexpr else _spec(value)
            if s is None:
                return self.fn[grid[:3]](*args, **kwargs)
            spec.append(s)
        device = torch.cuda.current_device()
        options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in self.names))
        key = (device, tuple(spec), options)
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self.fn[grid[:3]](*args, **kwargs)
            if compiled is not None and hasattr(compiled, "run") and hasattr(compiled, "function"):
                self.compiled[key] = compiled
            return compiled
        try:
            compiled.run(grid[0], grid[1], grid[2], _raw_stream(device), compiled.function,
                         compiled.packed_metadata, None, None, None, *values)
        except (TypeError, AttributeError):   # another Triton's launcher: the regular path from now on
            _direct_ok = False
            return self.fn[grid[:3]](*args, **kwargs)
        return compiled
