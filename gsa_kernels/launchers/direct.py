"""Launching a Triton kernel with less host time: once a specialization of its arguments has been
launched through the JIT, later calls that specialize the same way go straight to that compiled
kernel's launcher.

`kernel[grid](*args, **kw)` binds and specializes every argument, builds the cache key, checks the
kernel's globals and asks the driver for the device and stream on every call; on the H200's host one
launch costs 20-30 us that way, most of an eager decode step of two launches. The compiled kernel a
call needs depends only on its specialization: the arguments' dtypes, the 16-byte alignment of every
pointer, the integers, the constexprs and the launch options. `DirectLaunch` keys its compiled
kernels by all of those, integers by their value (finer than Triton's own key, never coarser: a new
value can only miss, never pick another specialization's binary), and calls the launcher with the
arguments in the kernel's parameter order, as the JIT does.

The JIT's path is kept for CPU tensors (Triton's interpreter), for arguments of other kinds, and while
a launch hook is installed (profilers see each launch through the JIT); without one the launcher gets
no launch metadata and no hooks (the JIT builds the metadata and calls the empty hook chains anyway).
"""
from __future__ import annotations

import torch
from triton import knobs

_FALLBACK = object()


def _spec(arg):
    """What Triton specializes an argument on, or _FALLBACK for a kind not handled here."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if arg is None or isinstance(arg, bool):
        return arg
    if isinstance(arg, int):
        return int, arg
    if isinstance(arg, float):
        return float            # a float32 scalar: not specialized
    return _FALLBACK


def _hooked(hook) -> bool:
    """A launch hook is installed: Triton 3.6 keeps a chain (HookChain) that is empty by default and
    that the JIT calls twice per launch all the same; earlier versions keep None or a function."""
    return hook is not None and getattr(hook, "calls", True) != []


class DirectLaunch:
    """`DirectLaunch(kernel)(grid, *args, **kwargs)` launches like `kernel[grid](*args, **kwargs)`, with the
    kernel's parameters not given positionally passed by keyword (constexprs) and launch options
    (num_warps, launch_pdl, ...) as keywords."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.names = tuple(kernel.arg_names)
        self.compiled: dict = {}        # specialization key -> (compiled kernel, keyword names in order)

    def __call__(self, grid, *args, **kwargs):
        if not (args and isinstance(args[0], torch.Tensor) and args[0].is_cuda) \
                or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
            return self.kernel[grid](*args, **kwargs)
        specs = tuple(map(_spec, args))
        if _FALLBACK in specs or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return self.kernel[grid](*args, **kwargs)
        device = torch.cuda.current_device()
        key = (device, specs, tuple(kwargs.items()))
        hit = self.compiled.get(key)
        if hit is None:
            compiled = self.kernel[grid](*args, **kwargs)      # compiles (or finds) and launches
            rest = self.names[len(args):]
            # every parameter after the positional ones given by keyword: else the JIT fills defaults,
            # and this key keeps going through it
            self.compiled[key] = (compiled, rest) if all(n in kwargs for n in rest) else (None, rest)
            return compiled
        compiled, rest = hit
        if compiled is None:
            return self.kernel[grid](*args, **kwargs)
        g0, g1, g2 = grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1
        stream = torch._C._cuda_getCurrentRawStream(device)     # what Triton's CUDA driver calls
        compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *(kwargs[n] for n in rest))
        return compiled
