"""Input validation for the public ops: every bad input gets an error naming the argument and what was expected.

All checks here read shapes, dtypes and devices only, except the cu_seqlens value checks, which read
the data: they run when cu_seqlens is on the CPU (free) or when GSA_KERNELS_VALIDATE=1 (one device
sync), never silently on the fast path, and not inside torch.compile (a graph break).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Problem:
    """The sizes of one call: q, k [B, T, H, K]; v [B, T, H, V]; s, g [B, T, H, M]; N sequences."""
    B: int
    T: int
    H: int
    K: int
    V: int
    M: int
    N: int
    dtype: torch.dtype


def _describe(name, x):
    return f"{name} (shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device})"


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_inputs(q, k, v, s, g, scale, initial_state, cu_seqlens) -> Problem:
    names = ("q", "k", "v", "s", "g")
    for name, x in zip(names, (q, k, v, s, g)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{_describe(name, x)} must be 4-D, batch-first [B, T, H, D]")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{_describe(name, x)}: expected float32, float16 or bfloat16")
    B, T, H, K = q.shape
    V, M = v.shape[-1], s.shape[-1]
    expected = {"k": (B, T, H, K), "v": (B, T, H, V), "s": (B, T, H, M), "g": (B, T, H, M)}
    for name, x in zip(names[1:], (k, v, s, g)):
        if tuple(x.shape) != expected[name]:
            raise ValueError(f"{_describe(name, x)}: expected shape {expected[name]} to match "
                             f"q {tuple(q.shape)}, v {tuple(v.shape)} and s {tuple(s.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{_describe(name, x)}: expected q's dtype {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{_describe(name, x)}: expected q's device {q.device}")
    if T < 1 or min(H, K, V, M) < 1:
        raise ValueError(f"{_describe('q', q)} with v {tuple(v.shape)}, s {tuple(s.shape)}: "
                         f"T, H, K, V and M must all be >= 1")
    if q.device.type != "cuda" and not _interpreter_on():
        raise ValueError(f"{_describe('q', q)}: the Triton kernels need CUDA tensors "
                         f"(or TRITON_INTERPRET=1 set before triton is imported, for CPU tensors)")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")

    N = B
    if cu_seqlens is not None:
        N = check_cu_seqlens(cu_seqlens, B, T, q.device)
    check_initial_state(initial_state, N, H, K, M, V, q.device)
    return Problem(B, T, H, K, V, M, N, q.dtype)


def check_cu_seqlens(cu_seqlens, B, T, device) -> int:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{_describe('cu_seqlens', cu_seqlens)}: expected int32 or int64 offsets")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{_describe('cu_seqlens', cu_seqlens)}: expected a 1-D tensor [N + 1], N >= 1")
    if B != 1:
        raise ValueError(f"cu_seqlens given with batch size {B}: pack the sequences along T with B == 1")
    if cu_seqlens.device.type != "cpu" and cu_seqlens.device != device:
        raise ValueError(f"{_describe('cu_seqlens', cu_seqlens)}: expected the CPU or q's device {device}")
    # reading the offsets inside torch.compile would be a graph break: a compiled graph checks shapes only
    if not torch.compiler.is_compiling() and (
            cu_seqlens.device.type == "cpu" or os.environ.get("GSA_KERNELS_VALIDATE") == "1"):
        c = cu_seqlens.cpu()
        if c[0].item() != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {c[0].item()}")
        if bool((c[1:] < c[:-1]).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {c.tolist()}")
        if c[-1].item() != T:
            raise ValueError(f"cu_seqlens must end at T = {T} (q's length), got {c[-1].item()}")
    return cu_seqlens.numel() - 1


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
        if tuple(x.shape) != shape:
            raise ValueError(f"{_describe(name, x)}: expected shape {shape} "
                             f"(one state per sequence: N = {N})")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{_describe(name, x)}: expected a float dtype (float32 recommended)")
        if x.device != device:
            raise ValueError(f"{_describe(name, x)}: expected q's device {device}")
