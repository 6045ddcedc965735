"""Opt-in autotuning at run time: with GSA_KERNELS_AUTOTUNE=1, chunk_gsa tunes a shape that no tuned
file holds on its first call, keeps the winner in the user cache and uses it from then on.

The search itself lives with the sweep (tuning/search.py), outside the library: the library never
imports its own tooling. It calls an autotuner registered here instead: `register_autotuner(tune,
save)`. The tuning package registers its own when tuning.autotuner is imported, and declares it as
the entry point `search` of the group `gsa_kernels.autotuners` (pyproject.toml), so that an installed
gsa-kernels finds it without any import: the first call that wants to tune and finds nothing
registered loads the entry points of that group (once per process). With no autotuner available
there is one warning, and the tuned or default configs serve.
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable

from gsa_kernels.launches import count, this_thread
from gsa_kernels.lookup import has_exact, reload, remember_unsaved
from gsa_kernels.problem_keys import current_arch, problem_key
from gsa_kernels.tuned_file import ENV_CACHE_DIR, parse_entry, user_cache_path, warn_once

ENV_AUTOTUNE = "GSA_KERNELS_AUTOTUNE"
ENTRY_POINT_GROUP = "gsa_kernels.autotuners"


@dataclass(frozen=True)
class Autotuner:
    """tune(*, B, T, H, K, V, M, dtype, device) -> {"entry": a tuned-file entry (a mapping)} or
    {"entry": None, "failed": why}: the search for one dense shape [B, T, H] with these head dims.
    save(path, entry, *, arch, device): merge the entry into the user-cache file at `path` (arch None:
    the interpreter); raises if it cannot be written."""
    tune: Callable[..., dict]
    save: Callable[..., None]


_lock = threading.Lock()
_autotuner: Autotuner | None = None
_searched = False            # the entry points were loaded (they are, once per process)
_failed: set = set()         # keys whose tuning failed: tried once per process, the fallback serves


def register_autotuner(tune: Callable[..., dict], save: Callable[..., None]):
    """Make (tune, save) the run-time autotuner (see `Autotuner`); the last registration wins."""
    global _autotuner
    with _lock:
        _autotuner = Autotuner(tune, save)


def _find_autotuner() -> Autotuner | None:
    """The registered autotuner, else the one the entry points register (searched once)."""
    global _searched
    if _autotuner is None and not _searched:
        _searched = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()()
            except Exception as e:     # a broken plugin must not stop the model: say so, go on
                warn_once(f"autotuner {ep.value}", f"could not load the autotuner {ep.value} (entry point "
                          f"{ep.name!r} of {ENTRY_POINT_GROUP}): {type(e).__name__}: {e}")
            if _autotuner is not None:
                break
    if _autotuner is None:
        warn_once("no autotuner", f"{ENV_AUTOTUNE}=1, but no autotuner is available (none registered with "
                  f"gsa_kernels.autotune.register_autotuner, no entry point in {ENTRY_POINT_GROUP}: "
                  f"install gsa-kernels with its tuning package, or import tuning.autotuner); using the "
                  f"tuned or default configs")
    return _autotuner


def autotune_enabled() -> bool:
    return os.environ.get(ENV_AUTOTUNE, "0").strip().lower() in ("1", "true", "yes", "on")


def maybe_autotune(*, B, T, H, K, V, M, N, dtype, device) -> bool:
    """With GSA_KERNELS_AUTOTUNE=1 and no exact entry for this problem: tune it now, persist the
    winner to the user cache and use it. Returns whether it tuned. Never inside an override."""
    if not autotune_enabled() or this_thread.override is not None:
        return False
    key = problem_key(K=K, V=V, M=M, dtype=dtype, tokens=B * T * H, seqs=N * H)
    if key in _failed or has_exact(key):
        return False
    autotuner = _find_autotuner()
    if autotuner is None:
        return False
    # a packed (varlen) batch is tuned as the dense [B, T, H] it packs, and stored under its own key
    result = autotuner.tune(B=B, T=T, H=H, K=K, V=V, M=M, dtype=dtype, device=device)
    count("autotune_runs")
    entry = result.get("entry")
    if entry is None:
        with _lock:
            _failed.add(key)
        warnings.warn(f"gsa_kernels: autotuning {key} failed ({result.get('failed')}); using the "
                      f"nearest tuned entry or the defaults", RuntimeWarning, stacklevel=3)
    else:
        entry["key"].update(tokens=key[4], seqs=key[5])
        arch = current_arch()
        path = user_cache_path(arch)
        try:
            autotuner.save(path, entry, arch=arch, device=device)
        except Exception as e:        # a file where the folder should be, read-only, a folder as the file
            remember_unsaved(key, parse_entry(entry, 0))
            warn_once(f"{path} (write)", f"could not save an autotuned entry to the user cache {path} "
                      f"({type(e).__name__}: {e}); it is used for this process only. Set {ENV_CACHE_DIR} "
                      f"to a writable folder to keep it")
    reload()        # the cache has the new entry
    return True


def reset():
    """Forget the failed keys and whether the entry points were searched (the registration stays)."""
    global _searched
    with _lock:
        _failed.clear()
        _searched = False
