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
    "chunk": {"BT": [32, 64]},
    "states_fwd": {"BK": [32, 64], "BV": [32, 64], "num_warps": [2, 4, 8], "num_stages": [1, 2, 3]},
    "chunk_fwd": {"BK": [32, 64, 128], "BV": [32, 64, 128], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
    "states_bwd": {"BK": [32, 64], "BV": [32, 64], "num_warps": [2, 4, 8], "num_stages": [1, 2, 3]},
    "chunk_bwd_dscores": {"BV": [32, 64], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
    "chunk_bwd_keys": {"BK": [32, 64], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
    "chunk_bwd_values": {"BV": [32, 64], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
}

KERNELS = tuple(k for k in CANDIDATES if k != "chunk")

_lock = threading.Lock()
_last_used: dict[str, dict] = {}


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def default_config(kernel: str, K: int, V: int, M: int, BT: int | None = None, seqs: int | None = None) -> dict:
    """A sound config for any shape, from the H100 measurements of docs/perf-notes.md (v5).

    Chunk 32 with 4 warps everywhere: the chunk kernels are latency-bound, and two small programs per
    SM hide each other's loads better than one large one. Register tiles scale down as the slot
    dim grows (a [BK, BM] float32 state tile must stay near 8K elements). The state walks are one
    program per (sequence-head, tile): with few sequence-heads (seqs = N*H), smaller tiles fill the GPU.
    """
    BM = _pow2(M)
    BT = BT or 32
    BK = min(128, _pow2(K), max(16, 8192 // BM))
    BV = min(128, _pow2(V), max(16, 8192 // BM))
    SK, SV = min(64, BK), min(64, BV)
    if seqs is not None and triton.cdiv(max(K, V), SK) * seqs < 128:
        SK, SV = min(32, SK), min(32, SV)
    cfg = {
        "chunk": {"BT": 32},
        "states_fwd": {"BK": SK, "BV": SV, "num_warps": 4, "num_stages": 2},
        "states_bwd": {"BK": SK, "BV": SV, "num_warps": 4, "num_stages": 2},
        "chunk_fwd": {"BK": BK, "BV": BV, "num_warps": 4, "num_stages": 3},
        "chunk_bwd_dscores": {"BV": min(32, BV), "num_warps": 4, "num_stages": 3},
        "chunk_bwd_keys": {"BK": min(64, BK), "num_warps": 4, "num_stages": 3},
        "chunk_bwd_values": {"BV": min(64, BV), "num_warps": 4, "num_stages": 3},
    }[kernel]
    if (BT > 32 or BM >= 128) and kernel.startswith("chunk_"):
        # larger chunks or slot dims hold 2-4x the [BT, BT] and [BT, BM] tiles: more warps, narrower
        # K/V tiles
        cfg["num_warps"] = 8
        for key in ("BK", "BV"):
            if key in cfg:
                cfg[key] = min(cfg[key], 64)
    return dict(cfg)


def launch_config(kernel: str, *, K: int, V: int, M: int, dtype, BT: int | None = None,
                  tokens: int | None = None, seqs: int | None = None) -> dict:
    """The config `kernel` launches with for this shape; recorded for `last_configs()`.

    BT is the call's chunk size. tokens = B*T*H and seqs = N*H complete the tuned-file key
    (gsa_kernels/tuned.py); without them the lookup takes the nearest entry for (K, V, M, dtype).
    No tuned entry: `default_config` (which also uses seqs to size the state-walk tiles).
    """
    if kernel not in CANDIDATES:
        raise KeyError(f"unknown kernel {kernel!r}; known: {sorted(CANDIDATES)}")
    cfg, source, entry = tuned.lookup(kernel, K=K, V=V, M=M, dtype=dtype, tokens=tokens, seqs=seqs)
    if cfg is None:
        cfg = default_config(kernel, K, V, M, BT, seqs)
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
