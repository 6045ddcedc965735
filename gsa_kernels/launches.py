"""What launches see and leave behind: per-thread config overrides, per-thread launch records, and
the process's counters of tuning work.

An override is the sweep's and the opt-in autotuner's handle on every launch: within `override(...)`
the named kernels launch with the given configs. Overrides and launch records are per thread, so that
a sweep or an autotune in one thread never steers another thread's launches, and `last_launches()`
answers for the thread that asks. A backward that PyTorch runs on its own thread carries the forward
thread's scope (`launch_scope`, `in_launch_scope`).
"""
from __future__ import annotations

import contextlib
import threading

from gsa_kernels import candidates


class _PerThread(threading.local):
    """What one thread has asked for and done: its active override and its launch records."""

    def __init__(self):
        self.override: dict[str, dict] | None = None
        self.launches: dict[str, dict] = {}


# Read on every launch (lookup.lookup); written only through override() and in_launch_scope().
this_thread = _PerThread()

_lock = threading.Lock()
_stats = {"autotune_benchmarks": 0, "autotune_runs": 0, "files_read": 0}


@contextlib.contextmanager
def override(configs: dict[str, dict]):
    """Within the block, in this thread, every kernel named in `configs` launches with that config,
    and chunk_gsa runs the Triton kernels (no backend dispatch, no opt-in autotuning). Nested blocks
    add to the outer one. Kernels not named keep their normal lookup; other threads are unaffected."""
    known = candidates.all_candidates()
    for kernel, cfg in configs.items():
        if kernel not in known:
            raise KeyError(f"override: unknown kernel {kernel!r}; known: {sorted(known)}")
        if set(cfg) != set(known[kernel]):
            raise ValueError(f"override: config of {kernel!r} must set {sorted(known[kernel])}, "
                             f"got {sorted(cfg)}")
    previous = this_thread.override
    this_thread.override = {**(previous or {}), **{k: dict(v) for k, v in configs.items()}}
    try:
        yield
    finally:
        this_thread.override = previous


def current_override() -> dict[str, dict] | None:
    """This thread's active override ({kernel: config}), or None."""
    return this_thread.override


def record_launch(kernel: str, cfg: dict, source: str, entry, file_triton: str | None = None):
    this_thread.launches[kernel] = {"config": dict(cfg), "source": source, "entry": entry,
                                    "file_triton": file_triton}


def amend_launch(kernel: str, cfg: dict):
    """Record the config `kernel` really launched with, after its launcher resolved an automatic
    choice of the looked-up one (a state walk's SEGMENT 0, a grouped reverse walk's stages:
    launchers/chunk.py)."""
    this_thread.launches[kernel]["config"] = dict(cfg)


def last_launches() -> dict[str, dict]:
    """Per kernel, this thread's most recent launch of it, in first-launch order: {"config", "source",
    "entry", "file_triton"}; source is one of override / device / tuned / user-cache / autotuned /
    nearest-device / nearest / default (gsa_kernels/lookup.py), entry the key of the tuned entry used
    (or None), file_triton the Triton version its file was made with when that is not this process's
    (else None). Covers every kernel, the recurrent and decode ones included."""
    return {k: {**v, "config": dict(v["config"])} for k, v in this_thread.launches.items()}


def clear_launches():
    """Forget this thread's launch records (the sweep uses it to see which kernels an op launches)."""
    this_thread.launches.clear()


def launch_scope() -> tuple:
    """This thread's (override, launch records): what its launches see and where they are recorded.
    An autograd Function takes it in its forward and enters it around its backward
    (`in_launch_scope`), since PyTorch runs a CUDA backward on its own worker thread: the backward's
    kernels then launch with the override of the thread that ran the forward, and are recorded there."""
    return this_thread.override, this_thread.launches


@contextlib.contextmanager
def in_launch_scope(scope: tuple):
    previous = this_thread.override, this_thread.launches
    this_thread.override, this_thread.launches = scope
    try:
        yield
    finally:
        this_thread.override, this_thread.launches = previous


def count(counter: str, n: int = 1):
    """Adds n to one of the counters of `stats` (the search calls it once per candidate it times)."""
    with _lock:
        _stats[counter] += n


def stats() -> dict:
    """Counters since start (or `configs.reset`): autotune_benchmarks (candidate timings by the
    search), autotune_runs (shapes tuned at run time), files_read (tuned/user-cache files parsed)."""
    with _lock:
        return dict(_stats)


def reset():
    """Zero the counters and forget this thread's launch records."""
    with _lock:
        for k in _stats:
            _stats[k] = 0
    this_thread.launches.clear()
