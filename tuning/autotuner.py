"""The run-time autotuner of gsa_kernels (GSA_KERNELS_AUTOTUNE=1): the sweep's search for one shape,
and the write of its winner to the user cache.

gsa_kernels never imports tuning: it calls the autotuner registered with
gsa_kernels.autotune.register_autotuner. Importing this module registers it (the tests do); an
installed gsa-kernels finds `register` through the entry point `search` of the group
`gsa_kernels.autotuners` (pyproject.toml) the first time a call wants to tune.
"""
from __future__ import annotations

from gsa_kernels.autotune import register_autotuner
from tuning import search, yamlio


def tune(*, B, T, H, K, V, M, dtype, device) -> dict:
    """search.tune_shape at its default settings: {"entry": ...} or {"entry": None, "failed": why}."""
    return search.tune_shape(B=B, T=T, H=H, K=K, V=V, M=M, dtype=dtype, device=device)


def save(path, entry, *, arch, device):
    """Merge `entry` into the user-cache file at `path` (arch None: measured in the interpreter)."""
    yamlio.merge_entry(path, entry, meta=search.run_meta(arch=arch or "interpreter", dry_run=arch is None,
                                                         device=device))


def register():
    register_autotuner(tune, save)


register()
