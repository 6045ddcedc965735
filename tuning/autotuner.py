"""The run-time autotuner of gsa_kernels (GSA_KERNELS_AUTOTUNE=1): the sweep's search for one shape,
and the write of its winner to the user cache.

gsa_kernels never imports tuning: it calls the autotuner registered with
gsa_kernels.autotune.register_autotuner. Importing this module registers it (the tests do); an
installed gsa-kernels finds `register` through the entry point `search` of the group
`gsa_kernels.autotuners` (pyproject.toml) the first time a call wants to tune.

The search is bounded: at most GSA_KERNELS_AUTOTUNE_CANDIDATES configs per kernel (default 8; 0: all).
The start config (the built-in default or the nearest file's) is always among them, so the winner is
never slower than what the call would have run untuned. The whole space is a sweep's job: at shape a
on the H200 it took 628 timings and 300 s of a model's first call; 8 per kernel are 68 timings.
"""
from __future__ import annotations

import os

from gsa_kernels.autotune import register_autotuner
from gsa_kernels.tuned_file import warn_once
from tuning import search, yamlio

ENV_CANDIDATES = "GSA_KERNELS_AUTOTUNE_CANDIDATES"
DEFAULT_CANDIDATES = 8


def max_candidates() -> int | None:
    """The per-kernel cap from GSA_KERNELS_AUTOTUNE_CANDIDATES: None (all) for 0; the default, after
    one warning, for anything but a whole number >= 0."""
    raw = os.environ.get(ENV_CANDIDATES, "").strip()
    if not raw:
        return DEFAULT_CANDIDATES
    try:
        n = int(raw)
        if n < 0:
            raise ValueError
    except ValueError:
        warn_once(f"{ENV_CANDIDATES}={raw}", f"{ENV_CANDIDATES}={raw!r} is not a whole number >= 0 (0: every "
                  f"candidate); searching {DEFAULT_CANDIDATES} per kernel")
        return DEFAULT_CANDIDATES
    return n or None


def tune(*, B, T, H, K, V, M, dtype, device) -> dict:
    """search.tune_shape at the run-time settings: {"entry": ...} or {"entry": None, "failed": why}."""
    return search.tune_shape(B=B, T=T, H=H, K=K, V=V, M=M, dtype=dtype, device=device,
                             settings=search.run_time_settings(device, max_candidates()))


def save(path, entry, *, arch, device):
    """Merge `entry` into the user-cache file at `path` (arch None: measured in the interpreter)."""
    yamlio.merge_entry(path, entry, meta=search.run_meta(arch=arch or "interpreter", dry_run=arch is None,
                                                         device=device))


def register():
    register_autotuner(tune, save)


register()
