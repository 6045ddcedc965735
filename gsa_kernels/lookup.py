"""Which tuned entry a launch takes its config from, and which backend a chunk_gsa call runs.

Where a launch config comes from, first match wins (`configs.launch_config` asks `lookup`):

1. an active `launches.override({kernel: cfg})` (the sweep and the opt-in autotuner time candidates
   this way);
2. the tuned files (tuned_file.py): an entry whose key equals the problem's key (problem_keys.py) is
   used as is, no autotuning, no benchmark: first from the file of this GPU model (source "device"),
   then from the arch's file (source "tuned", measured on any GPU of the arch);
3. the user cache (tuned_file.py): entries the opt-in autotuner measured on this machine, exact key;
4. with `GSA_KERNELS_AUTOTUNE=1` only: `chunk_gsa` tunes the missing key on the spot (autotune.py),
   writes it to the user cache, and it becomes case 3 for this and every later process;
5. the nearest entry (distance below) whose configs fit the problem's dims: of this GPU model's file
   first ("nearest-device"), then of the arch's file and the user cache ("nearest");
6. `configs.default_config`.

Nearest distance between a problem and an entry (smaller is nearer, ties go to the earlier entry):
    |log2 K - log2 K'| + |log2 V - log2 V'| + 2 |log2 M - log2 M'|
    + 0.5 |log2 tokens - log2 tokens'| + 0.5 |log2 seqs - log2 seqs'| + dtype term,
dtype term 0 (same), 1 (float16 vs bfloat16: same tile economics), 4 (half vs float32: IEEE dots).
M weighs double because BM = pow2(M) sizes every tile of every kernel; the work-size buckets weigh
half because they move the best config least. A nearest entry is only taken if every kernel's config
passes `resources.fits` at the problem's dims, so a config tuned for a small M never overflows at a
large one.

fused_recurrent_gsa's kernels (the token-by-token ones and the decode step) go through the same
order among the entries of their op (`op: recurrent`) that hold the launching kernel's config: a
recurrent entry holds the kernels its shape launched, and only a T = 1 shape launches the decode step.

The torch.compile backend (an entry with `backend: torch_compile`) is honoured only for an exact key
from a file made with the same torch major.minor; everywhere else the Triton kernels run. It compiles
with the mode the entry was timed with (`compile_mode`).

The selection is memoized per key (a launch looks it up every time); `reload` and `reset` forget it.
"""
from __future__ import annotations

import math
import threading

import torch

from gsa_kernels.candidates import op_of
from gsa_kernels.launches import this_thread
from gsa_kernels.problem_keys import problem_key
from gsa_kernels.resources import fits, recurrent_fits
from gsa_kernels.tuned_file import Entry, load_tables, reread

_lock = threading.Lock()
_TABLE_OF = {"device": "device", "tuned": "tuned", "user-cache": "cache"}   # exact sources -> their table
_selected: dict = {}                   # (op, problem key, kernel or None) -> (Entry | None, source)
# entries tuned in this process that the user cache could not store (unwritable location): kept here,
# so that the process uses what it measured and does not tune the same key again
_unsaved: dict = {}
_epoch = 0


def distance(a: tuple, b: tuple) -> float:
    """The nearest-entry distance between two problem keys (module docstring)."""
    K, V, M, dt, tokens, seqs = a
    K2, V2, M2, dt2, tokens2, seqs2 = b
    half = {"float16", "bfloat16"}
    d_dtype = 0 if dt == dt2 else (1 if {dt, dt2} <= half else 4)
    d = abs(math.log2(K / K2)) + abs(math.log2(V / V2)) + 2 * abs(math.log2(M / M2)) + d_dtype
    if tokens is not None:
        d += 0.5 * abs(math.log2(tokens / tokens2))
    if seqs is not None:
        d += 0.5 * abs(math.log2(seqs / seqs2))
    return d


def entry_fits(entry: Entry, key: tuple) -> bool:
    """Whether every config of `entry` passes the resource estimate at the dims of `key`."""
    K, V, M, dt = key[:4]
    if entry.op == "recurrent":
        return all(recurrent_fits(kernel, cfg, K=K, V=V, M=M) for kernel, cfg in entry.configs.items())
    BT = entry.configs.get("chunk", {}).get("BT", 64)
    return all(fits(cfg, K=K, V=V, M=M, BT=BT, dtype=dt) for cfg in entry.configs.values())


def select_entry(key: tuple, op: str = "chunk", kernel: str | None = None) -> tuple[Entry | None, str]:
    """(entry, source) for a problem key of `op`: exact tuned, exact user-cache, autotuned in this
    process, nearest that fits, or (None, "default"). With `kernel`, only entries that hold its config
    count (recurrent entries hold the kernels their shape launched: the decode step's at T = 1 only)."""
    memo = (op, key, kernel)
    with _lock:
        if memo in _selected:
            return _selected[memo]
        tables = load_tables()
        usable = (lambda e: e.op == op) if kernel is None else (lambda e: e.op == op and kernel in e.configs)
        found = None
        exact_possible = key[4] is not None and key[5] is not None
        for name, source in (("device", "device"), ("tuned", "tuned"), ("cache", "user-cache")):
            table = tables[name]
            entry = table.exact.get((op, key)) if exact_possible and table is not None else None
            if entry is not None and usable(entry):
                found = (entry, source)
                break
        if found is None and op == "chunk" and key in _unsaved:
            found = (_unsaved[key], "autotuned")
        if found is None and tables["device"] is not None:
            found = _nearest(key, [e for e in tables["device"].entries if usable(e)], "nearest-device")
        if found is None:
            pool = [e for name in ("tuned", "cache") if tables[name] is not None
                    for e in tables[name].entries] + (list(_unsaved.values()) if op == "chunk" else [])
            found = _nearest(key, [e for e in pool if usable(e)], "nearest") or (None, "default")
        _selected[memo] = found
        return found


def _nearest(key: tuple, pool: list, source: str):
    """(the nearest entry of pool whose configs fit, source), ties to the earlier; None if none fits."""
    ranked = sorted(enumerate(pool), key=lambda ie: (distance(key, ie[1].key), ie[0]))
    return next(((e, source) for _, e in ranked if entry_fits(e, key)), None)


def lookup(kernel: str, *, K, V, M, dtype, tokens=None, seqs=None) -> tuple[dict | None, str, Entry | None]:
    """(config or None, source, the tuned entry used or None) for one launch; None means "use the
    default config". KeyError naming the known kernels for an unknown one."""
    forced = this_thread.override
    if forced is not None and kernel in forced:
        return dict(forced[kernel]), "override", None
    key = problem_key(K=K, V=V, M=M, dtype=dtype, tokens=tokens, seqs=seqs)
    op = op_of(kernel)
    entry, source = select_entry(key, op, None if op == "chunk" else kernel)
    if entry is None or kernel not in entry.configs:        # no entry, or this kernel's configs are stale
        return None, "default", None
    return dict(entry.configs[kernel]), source, entry


def has_exact(key: tuple) -> bool:
    return select_entry(key)[1] in ("device", "tuned", "user-cache", "autotuned")


def backend_for(key: tuple) -> str:
    """"torch_compile" only for an exact entry that says so, from a file of this torch major.minor."""
    if this_thread.override is not None:
        return "triton"
    entry, source = select_entry(key)
    if entry is None or source not in _TABLE_OF or entry.backend != "torch_compile":
        return "triton"       # an autotuned entry the cache could not keep has no torch version: Triton
    table = load_tables()[_TABLE_OF[source]]
    file_torch = str(table.meta.get("torch", ""))
    if file_torch.split(".")[:2] != torch.__version__.split(".")[:2]:
        return "triton"
    return "torch_compile"


def compile_mode_for(key: tuple) -> str | None:
    """The torch.compile mode the exact entry of `key` timed its torch_compile backend with (None: the
    entry names none, an older sweep's; torch_chunked then uses its default)."""
    entry, _ = select_entry(key)
    return None if entry is None else entry.compile_mode


def remember_unsaved(key: tuple, entry: Entry):
    """Use `entry` for `key` for the rest of the process: it was tuned here, and no file holds it."""
    with _lock:
        _unsaved[key] = entry


def reload():
    """Read the files again and select again (the user cache has changed)."""
    global _epoch
    with _lock:
        reread()
        _selected.clear()
        _epoch += 1


def reset():
    """Forget the selections and the entries no file holds."""
    global _epoch
    with _lock:
        _selected.clear()
        _unsaved.clear()
        _epoch += 1


def epoch() -> int:
    """A count of the forgettings (`reload`, `reset`): a caller that memoizes configs past the
    lookup (the eager decode step) starts over when it changes."""
    return _epoch
