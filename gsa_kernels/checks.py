"""Input validation for the public ops: every bad input gets an error naming the argument and what was expected.

All checks here read shapes, dtypes and devices only, except the value checks, which read the data:
cu_seqlens when it is on the CPU (free) or with GSA_KERNELS_VALIDATE=1 (one device sync), and g <= 0
with GSA_KERNELS_VALIDATE=1 only; never silently on the fast path, and not inside torch.compile (a
graph break).

Under TRITON_INTERPRET=1 (CPU tensors), `check_interpreter` also refuses two set-ups in which
Triton's interpreter (3.6) runs the kernels wrongly or not at all, before any launch:
  * bfloat16 inputs to an op whose kernels take tl.dot on bfloat16 operands (chunk_gsa): the
    interpreter keeps bfloat16 as raw uint16 bits and its dot multiplies those bit patterns as
    integers, so o and the states come out orders of magnitude off (relative errors from ~1 to ~1e10,
    growing with T) with no warning. TypeError, like the other dtype errors. fused_recurrent_gsa and
    its decode step upcast every bfloat16 load to float32 and take no dots: they run bfloat16
    correctly in the interpreter and are not refused.
  * numpy >= 2.4: the interpreter takes int() of one-element arrays (tensor.__index__), which numpy
    2.4 rejects, so every launch fails inside Triton with "only 0-dimensional arrays can be converted
    to Python scalars". RuntimeError (the environment, not an argument) naming the fix.
"""
from __future__ import annotations

import functools
import os
import re
from typing import NamedTuple

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Problem(NamedTuple):
    """The sizes of one call: q [B, T, HQ, K]; k [B, T, H, K]; v [B, T, H, V]; s, g [B, T, H, M]; N
    sequences. HQ = H except with grouped query heads (GQA): HQ a multiple of H, each kv head's memory
    read by `group` = HQ / H query heads. (A NamedTuple: a decode step builds one per call, and a
    frozen dataclass's construction costs about 1 us of host time more.)"""
    B: int
    T: int
    H: int
    K: int
    V: int
    M: int
    N: int
    dtype: torch.dtype
    HQ: int

    @property
    def group(self) -> int:
        return self.HQ // self.H


def _describe(name, x):
    return f"{name} (shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device})"


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _numpy_version_breaks_interpreter(version: str) -> bool:
    """numpy 2.4 and later (pre-releases included) turned int() of an array with ndim > 0 from a
    warning into a TypeError. Keyed by the version string, so the parse runs once per process."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return m is not None and (int(m[1]), int(m[2])) >= (2, 4)


@torch.compiler.assume_constant_result
def _numpy_breaks_interpreter() -> bool:
    # torch.compile runs this eagerly and keeps the result as a constant: the installed numpy does
    # not change under a compiled graph, and Dynamo need not trace the cache or the parse
    return _numpy_version_breaks_interpreter(np.__version__)


def check_interpreter(dtype, *, bf16_dots=True):
    """Errors for the set-ups Triton's interpreter cannot run (module docstring); nothing when the
    interpreter is off. `bf16_dots`: the op's kernels take tl.dot on bfloat16 operands. Reads an
    environment variable, a dtype and numpy's version string (its comparison cached): no tensor data."""
    if not _interpreter_on():
        return
    if _numpy_breaks_interpreter():
        raise RuntimeError(
            f"numpy {np.__version__} under TRITON_INTERPRET=1: Triton's interpreter converts one-element "
            f"arrays with int(), which numpy >= 2.4 rejects (\"only 0-dimensional arrays can be converted "
            f"to Python scalars\"), so every kernel launch would fail; install numpy<2.4: "
            f"pip install \"numpy<2.4\" (the test extra pins it), or run on a GPU")
    if bf16_dots and dtype == torch.bfloat16:
        raise TypeError(
            "bfloat16 inputs under TRITON_INTERPRET=1: Triton's interpreter computes bfloat16 dots wrongly "
            "(it multiplies the raw bfloat16 bits as integers: results orders of magnitude off); use "
            "float16/float32 on CPU, or a GPU")


def gate_dtype_ok(x_dtype, q_dtype) -> bool:
    """s and g may be in q's dtype, or in float32 when q is float16 / bfloat16 (the kernels read the
    gates in their own dtype and compute them in float32)."""
    return x_dtype == q_dtype or (x_dtype == torch.float32 and q_dtype in (torch.float16, torch.bfloat16))


def check_inputs(q, k, v, s, g, scale, initial_state, cu_seqlens, *, bf16_dots=True,
                 cu_seqlens_cpu=None) -> Problem:
    """Validates one call's arguments and returns its sizes. `bf16_dots`: the op's kernels take tl.dot
    on bfloat16 operands (chunk_gsa's do; fused_recurrent_gsa's do not), which Triton's interpreter
    gets wrong: see check_interpreter. g None: ABC mode (checked as s is, before the gates exist).
    cu_seqlens_cpu: a host copy of cu_seqlens, used for its value checks instead of a device sync."""
    names = ("q", "k", "v", "s", "g")
    tensors = (q, k, v, s, g)
    for name, x in zip(names, tensors):
        if name == "g" and x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{_describe(name, x)} must be 4-D, batch-first [B, T, H, D]")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{_describe(name, x)}: expected float32, float16 or bfloat16")
    B, T, HQ, K = q.shape
    V, M = v.shape[-1], s.shape[-1]
    H = k.shape[2]
    if H < 1 or HQ % H:
        raise ValueError(f"q has {HQ} heads and k {H}: grouped query heads need q's head count to be a "
                         f"multiple of k's (and v's, s's and g's)")
    dtype, device = q.dtype, q.device
    # q's device as an int and a flag: cheaper to compare than torch.device objects (-1: not an
    # accelerator; those are compared whole)
    where, on_cuda = q.get_device(), q.is_cuda
    expected = ((B, T, H, K), (B, T, H, V), (B, T, H, M), (B, T, H, M))
    for name, x, shape in zip(names[1:], tensors[1:], expected):
        if x is None:
            continue
        if x.shape != shape:
            raise ValueError(f"{_describe(name, x)}: expected shape {shape} to match "
                             f"q {tuple(q.shape)} (its heads a multiple of k's), k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)} and s {tuple(s.shape)}")
        if x.dtype != dtype:
            if name in ("k", "v"):
                raise TypeError(f"{_describe(name, x)}: expected q's dtype {dtype}")
            if not gate_dtype_ok(x.dtype, dtype):
                also = " or float32" if dtype in (torch.float16, torch.bfloat16) else ""
                raise TypeError(f"{_describe(name, x)}: expected q's dtype {dtype}{also}")
        if x.get_device() != where or x.is_cuda != on_cuda or (where < 0 and x.device != device):
            raise ValueError(f"{_describe(name, x)}: expected q's device {device}")
    if T < 1 or min(H, K, V, M) < 1:
        raise ValueError(f"{_describe('q', q)} with v {tuple(v.shape)}, s {tuple(s.shape)}: "
                         f"T, H, K, V and M must all be >= 1")
    if where < 0 and not _interpreter_on():
        raise ValueError(f"{_describe('q', q)}: the Triton kernels need CUDA tensors "
                         f"(or TRITON_INTERPRET=1 set before triton is imported, for CPU tensors)")
    check_interpreter(dtype, bf16_dots=bf16_dots)
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")

    if validating() and g is not None:
        check_gate_values(g)
    N = B
    if cu_seqlens_cpu is not None and cu_seqlens is None:
        raise ValueError("cu_seqlens_cpu given without cu_seqlens: it is a host copy of cu_seqlens")
    if cu_seqlens is not None:
        N = check_cu_seqlens(cu_seqlens, B, T, device, cu_seqlens_cpu)
    check_initial_state(initial_state, N, H, K, M, V, device)
    return Problem(B, T, H, K, V, M, N, dtype, HQ)


def validating() -> bool:
    """GSA_KERNELS_VALIDATE=1: the checks that read tensor data (one device sync each) run, outside
    torch.compile (a graph break there)."""
    return os.environ.get("GSA_KERNELS_VALIDATE") == "1" and not torch.compiler.is_compiling()


def check_gate_values(g):
    """g must lie in GSA's domain [-inf, 0]: exp(g) is a forget gate, at most 1. A positive g makes a
    memory grow at every step, which the chunk kernels' factored decays do not follow (they assume no
    decay above 1), so the result is undefined there; this says where instead."""
    positive = g > 0
    if bool(positive.any()):
        first = [int(i) for i in positive.nonzero()[0]]
        raise ValueError(f"{_describe('g', g)}: {int(positive.sum())} values > 0 (the largest "
                         f"{float(g.max())}, the first at index {first}); the log forget gate must lie in "
                         f"[-inf, 0] (exp(g) <= 1; -inf resets a slot)")


def check_cu_seqlens(cu_seqlens, B, T, device, cu_seqlens_cpu=None) -> int:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens_cpu is not None:
        if not isinstance(cu_seqlens_cpu, torch.Tensor):
            raise TypeError(f"cu_seqlens_cpu must be a torch.Tensor, got {type(cu_seqlens_cpu).__name__}")
        if cu_seqlens_cpu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{_describe('cu_seqlens_cpu', cu_seqlens_cpu)}: expected int32 or int64 offsets")
        if cu_seqlens_cpu.shape != cu_seqlens.shape:
            raise ValueError(f"{_describe('cu_seqlens_cpu', cu_seqlens_cpu)}: expected the shape of "
                             f"{_describe('cu_seqlens', cu_seqlens)}, of which it is a host copy")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{_describe('cu_seqlens', cu_seqlens)}: expected int32 or int64 offsets")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{_describe('cu_seqlens', cu_seqlens)}: expected a 1-D tensor [N + 1], N >= 1")
    if B != 1:
        raise ValueError(f"cu_seqlens given with batch size {B}: pack the sequences along T with B == 1")
    if cu_seqlens.device.type != "cpu" and cu_seqlens.device != device:
        raise ValueError(f"{_describe('cu_seqlens', cu_seqlens)}: expected the CPU or q's device {device}")
    # reading the offsets inside torch.compile would be a graph break: a compiled graph checks shapes only
    # cu_seqlens_cpu, the caller's host copy, is checked in its place (free: no sync); it is trusted
    # to hold cu_seqlens's values, which only GSA_KERNELS_VALIDATE=1 compares
    if not torch.compiler.is_compiling() and cu_seqlens_cpu is not None:
        c = cu_seqlens_cpu.cpu()
        if validating() and not torch.equal(c.long(), cu_seqlens.cpu().long()):
            raise ValueError(f"cu_seqlens_cpu {c.tolist()} differs from cu_seqlens {cu_seqlens.tolist()}")
        _check_offsets(c, T)
    elif not torch.compiler.is_compiling() and (cu_seqlens.device.type == "cpu" or validating()):
        _check_offsets(cu_seqlens.cpu(), T)
    return cu_seqlens.numel() - 1


def _check_offsets(c, T):
    """The offsets' values, from a host tensor: start at 0, never decrease, end at T."""
    if c[0].item() != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {c[0].item()}")
    if bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {c.tolist()}")
    if c[-1].item() != T:
        raise ValueError(f"cu_seqlens must end at T = {T} (q's length), got {c[-1].item()}")


def check_initial_state(initial_state, N, H, K, M, V, device):
    if initial_state is None:
        return
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise TypeError("initial_state must be a pair (hk0 [N, H, K, M], hv0 [N, H, M, V]) or None")
    for name, x, shape in (("initial_state[0] (hk0)", initial_state[0], (N, H, K, M)),
                           ("initial_state[1] (hv0)", initial_state[1], (N, H, M, V))):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
        if x.shape != shape:
            raise ValueError(f"{_describe(name, x)}: expected shape {shape} "
                             f"(one state per sequence: N = {N})")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{_describe(name, x)}: expected a float dtype (float32 recommended)")
        if x.device != device:
            raise ValueError(f"{_describe(name, x)}: expected q's device {device}")
