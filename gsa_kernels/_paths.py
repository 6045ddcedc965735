"""Where the package's data files live, for a checkout, an editable install and a regular install."""
from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def tuned_configs_dir() -> Path:
    """The folder that holds the tuned launch configurations, `<arch>.yaml` (e.g. sm90.yaml).

    A regular install carries a copy of the repository's tuned_configs/ inside the package, as
    gsa_kernels/tuned_configs/ (see setup.py). A checkout or an editable install has no such copy
    and reads the repository's own tuned_configs/ next to the package, so a new sweep is seen
    without reinstalling. The folder may not exist yet (nothing tuned): callers treat that as
    "no tuned file" and fall back to their defaults.
    """
    installed = _PACKAGE_DIR / "tuned_configs"
    if installed.is_dir():
        return installed
    return _PACKAGE_DIR.parent / "tuned_configs"
