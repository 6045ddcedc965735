"""The candidate launch configs of every kernel: the search space of the sweep and of a tuned file.

Every tunable of every kernel (block sizes, num_warps, num_stages, and the chunk size BT, which is
shared by all kernels of one call because it fixes the layout of the saved states) is named here and
nowhere else. The sweep (tuning/) times these candidates; a tuned file may only name values listed
here, and records a hash of each kernel's lists (`candidates_hash`), so that a changed list makes
that kernel's tuned configs stale. Readers take `CANDIDATES` from this module at call time (never a
copy of it), so that the tests can narrow the space.
"""
from __future__ import annotations

import hashlib
import json

# kernel -> parameter -> candidate values (the sweep's search space)
CANDIDATES: dict[str, dict[str, list[int]]] = {
    "chunk": {"BT": [32, 64]},
    # the state walks: SPLIT 0 pairs an Hk and an Hv tile per program, 1 gives each its own program;
    # SEGMENT: chunks per segment of the two-level walk, 0 from the work, 1 one level
    # (configs.walk_segment_chunks); 2 warps and 1 stage (no prefetch) were never close on the H100
    "states_fwd": {"BK": [32, 64], "BV": [32, 64], "SPLIT": [0, 1], "SEGMENT": [0, 1, 16, 32, 64],
                   "num_warps": [4, 8], "num_stages": [2, 3]},
    "chunk_fwd": {"BK": [32, 64, 128], "BV": [32, 64, 128], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
    # the forward-only path (no input requires grad, half inputs): the same kernels with scaled float16
    # chunk states (kernels/states.py `_store_scaled`), tuned on their own: the walk's row maxima add
    # a step to its serial path, so it may want other warps than the training walk
    "states_fwd_compact": {"BK": [32, 64], "BV": [32, 64], "SPLIT": [0, 1], "SEGMENT": [0, 1, 16, 32, 64],
                           "num_warps": [4, 8], "num_stages": [2, 3]},
    "chunk_fwd_compact": {"BK": [32, 64, 128], "BV": [32, 64, 128], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
    "states_bwd": {"BK": [32, 64], "BV": [32, 64], "SPLIT": [0, 1], "SEGMENT": [0, 1, 16, 32, 64],
                   "num_warps": [4, 8], "num_stages": [2, 3]},
    "chunk_bwd_dscores": {"BV": [32, 64], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
    "chunk_bwd_keys": {"BK": [32, 64], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
    "chunk_bwd_values": {"BV": [32, 64], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
}

KERNELS = tuple(k for k in CANDIDATES if k != "chunk")
# launched only by the forward-only path of half inputs (a call where no input requires grad)
FORWARD_ONLY = ("states_fwd_compact", "chunk_fwd_compact")

# The token-by-token and decode kernels of fused_recurrent_gsa: tuned by `python -m tuning.sweep --op
# recurrent` into entries of their own (`op: recurrent`), each holding the kernels its shape launched
# (T = 1 without gradients is the decode step)
RECURRENT_CANDIDATES: dict[str, dict[str, list[int]]] = {
    # fused_recurrent (token by token): slot tiles BMS, K / V tiles BKS / BVS; the other axis is whole
    "recurrent_fwd_keys": {"BMS": [2, 4, 8, 16, 32], "num_warps": [2, 4, 8]},
    "recurrent_fwd_values": {"BV": [16, 32, 64, 128], "num_warps": [2, 4, 8]},
    "recurrent_bwd_dp": {"BMS": [2, 4, 8, 16, 32], "num_warps": [2, 4, 8]},
    "recurrent_bwd_keys": {"BKS": [8, 16, 32, 64], "num_warps": [2, 4, 8]},
    "recurrent_bwd_values": {"BVS": [8, 16, 32, 64], "num_warps": [2, 4, 8]},
    "recurrent_bwd_gates": {"BK": [16, 32, 64], "BV": [16, 32, 64], "num_warps": [1, 2, 4]},
    # the T = 1 decode step (two launches: BK for the keys' side, BV for the values'). No num_stages:
    # its loads feed no dot, so Triton 3.6 does not pipeline them (the sm90 SASS is the same for 1, 2
    # and 3 stages). PDL 1: the values' launch starts during the keys' (programmatic dependent
    # launch; sm90 and later, ignored elsewhere)
    "decode": {"BK": [16, 32, 64, 128], "BV": [16, 32, 64, 128], "num_warps": [1, 2, 4, 8], "PDL": [1, 0]},
}


# an op of the tuned file: the candidates of the kernels it launches
OPS = ("chunk", "recurrent")


def op_candidates(op: str) -> dict:
    """The candidate lists of `op`'s kernels (read at call time: the tests narrow them)."""
    if op == "chunk":
        return CANDIDATES
    if op == "recurrent":
        return RECURRENT_CANDIDATES
    raise KeyError(f"unknown op {op!r}; known: {OPS}")


def op_of(kernel: str) -> str:
    """The op (tuned-file entry kind) whose entries hold `kernel`'s configs."""
    for op in OPS:
        if kernel in op_candidates(op):
            return op
    raise KeyError(f"unknown kernel {kernel!r}; known: {sorted(CANDIDATES) + sorted(RECURRENT_CANDIDATES)}")


def all_candidates() -> dict:
    """Every tunable kernel's candidate lists, of every op."""
    return {kernel: params for op in OPS for kernel, params in op_candidates(op).items()}


def candidates_hash(kernel: str) -> str:
    """A hash of `kernel`'s candidate lists, as a tuned file records it per kernel."""
    text = json.dumps(all_candidates()[kernel], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
