"""The key of a problem in a tuned file: which entry's launch configs a call may use.

Key of a problem: (K, V, M, dtype, tokens, seqs), with tokens = B*T*H (token-heads: the chunk kernels'
work, their grid is tokens / BT) and seqs = N*H (sequence-heads: the state walks' parallelism, which
is what separates shape a [8, 2048, 4] from shape c [2, 8192, 4] at equal tokens), each rounded to
the nearest power of two (`bucket`). Both are bucketed because time per token is flat within a factor
sqrt(2) and the file must stay small.
"""
from __future__ import annotations

import math
import re

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KEY_FIELDS = ("K", "V", "M", "dtype", "tokens", "seqs")


def current_arch() -> str | None:
    """`sm<major><minor>` of the current CUDA device, None without one (the interpreter has no arch)."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def device_slug(name: str) -> str:
    """A GPU's model name as it appears in a tuned file's name: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def current_device_model() -> str | None:
    """The current CUDA device's model (`device_slug` of its name), None without one."""
    if not torch.cuda.is_available():
        return None
    return device_slug(torch.cuda.get_device_name())


def dtype_name(dtype) -> str:
    for name, dt in DTYPES.items():
        if dtype == dt or dtype == name:
            return name
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def bucket(n: int) -> int:
    """n rounded to the nearest power of two (in log space), at least 1."""
    return 1 << max(0, round(math.log2(max(1, int(n)))))


def problem_key(*, K, V, M, dtype, tokens=None, seqs=None) -> tuple:
    """(K, V, M, dtype name, tokens bucket or None, seqs bucket or None)."""
    return (int(K), int(V), int(M), dtype_name(dtype),
            None if tokens is None else bucket(tokens), None if seqs is None else bucket(seqs))
