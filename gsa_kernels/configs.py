"""Launch configurations: the candidate list of every kernel, and the one lookup that picks a config.

Every tunable of every kernel (block sizes, num_warps, num_stages, and the chunk size BT, which is
shared by all kernels of one call because it fixes the layout of the saved states) is named here and
nowhere else. `launch_config` is the only place that decides; the tuning sweep (tuning/) times the
candidates of CANDIDATES and writes winners that this lookup will read. Until a tuned file exists
the defaults below apply: they were chosen for the H100 and checked on it (docs/perf-notes.md).
"""
from __future__ import annotations

import threading

import triton

from gsa_kernels import tuned
from gsa_kernels.tuned import override  # noqa: F401  (configs.override, the sweep's handle)

# kernel -> parameter -> candidate values (the sweep's search space)
CANDIDATES: dict[str, dict[str, list[int]]] = {
    "chunk": {"BT": [32, 64, 128]},
    "states_fwd": {"BK": [32, 64], "BV": [32, 64], "num_warps": [2, 4, 8], "num_stages": [1, 2, 3]},
    "chunk_fwd": {"BC": [8, 16], "BK": [32, 64], "BV": [32, 64], "num_warps": [4, 8],
                  "num_stages": [1, 2, 3]},
    "states_bwd": {"BK": [32, 64], "BV": [32, 64], "num_warps": [2, 4, 8], "num_stages": [1, 2, 3]},
    "chunk_bwd_dscores": {"BC": [8, 16], "BV": [32, 64], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
    "chunk_bwd": {"BC": [8, 16], "BK": [32, 64], "BV": [32, 64], "num_warps": [4, 8],
                  "num_stages": [1, 2, 3]},
}

KERNELS = tuple(k for k in CANDIDATES if k != "chunk")

_lock = threading.Lock()
_last_used: dict[str, dict] = {}


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def default_config(kernel: str, K: int, V: int, M: int) -> dict:
    """A sound config for any shape: tiles no larger than the (padded) dims, BT smaller for wide M."""
    BM = _pow2(M)
    BT = 64 if BM <= 128 else 32
    BK = min(64, _pow2(K))
    BV = min(64, _pow2(V))
    if BM > 64:
        BK, BV = min(BK, 32), min(BV, 32)
    cfg = {
        "chunk": {"BT": BT},
        "states_fwd": {"BK": BK, "BV": BV, "num_warps": 8, "num_stages": 2},
        "states_bwd": {"BK": BK, "BV": BV, "num_warps": 8, "num_stages": 2},
        "chunk_fwd": {"BC": 16, "BK": BK, "BV": BV, "num_warps": 8, "num_stages": 2},
        "chunk_bwd_dscores": {"BC": 16, "BV": BV, "num_warps": 8, "num_stages": 2},
        "chunk_bwd": {"BC": 16, "BK": BK, "BV": BV, "num_warps": 8, "num_stages": 2},
    }[kernel]
    return dict(cfg)


def launch_config(kernel: str, *, K: int, V: int, M: int, dtype, BT: int | None = None,
                  tokens: int | None = None, seqs: int | None = None) -> dict:
    """The config `kernel` launches with for this shape; recorded for `last_configs()`.

    tokens = B*T*H and seqs = N*H complete the tuned-file key (gsa_kernels/tuned.py); without them
    the lookup takes the nearest entry for (K, V, M, dtype). No tuned entry: `default_config`.
    """
    if kernel not in CANDIDATES:
        raise KeyError(f"unknown kernel {kernel!r}; known: {sorted(CANDIDATES)}")
    cfg, source, entry = tuned.lookup(kernel, K=K, V=V, M=M, dtype=dtype, tokens=tokens, seqs=seqs)
    if cfg is None:
        cfg = default_config(kernel, K, V, M)
    if "BC" in cfg and BT is not None:
        cfg["BC"] = min(cfg["BC"], BT)      # the sub-chunk never exceeds the chunk actually used
    with _lock:
        _last_used[kernel] = dict(cfg)
    tuned.record_launch(kernel, cfg, source, entry)
    return cfg


def last_configs() -> dict[str, dict]:
    """The config each kernel used at its most recent launch in this process (for tests and debugging)."""
    with _lock:
        return {k: dict(v) for k, v in _last_used.items()}


def clear_last_configs():
    """Forget the recorded launches (the sweep uses it to see which kernels an op launches)."""
    with _lock:
        _last_used.clear()
