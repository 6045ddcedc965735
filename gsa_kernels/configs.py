"""Launch configurations: the default config of every kernel, and the one lookup that picks a config.

`launch_config` is the only place that decides which config a kernel launches with: a tuned entry
(lookup.py) or `default_config`, with a known miscompile always avoided. The candidate values live in
candidates.py; the tuning sweep (tuning/) times them and writes winners that the lookup will read.
Until a tuned file exists the defaults below apply: they were chosen for the H100 and checked on it
(docs/design.md, "Tuning design").
"""
from __future__ import annotations

import functools

import torch

from gsa_kernels import autotune, launches, lookup, tuned_file
from gsa_kernels.intmath import cdiv, next_pow2, pow2_at_least

# Register tiles of the token-by-token kernels: one whole axis times a tile of the other, kept near
# this many float32 elements (16 per thread at 4 warps would be 2048; 4096 keeps loads wide).
_RECURRENT_TILE = 4096


def _tile(whole: int, dim: int, lo: int = 2, hi: int = 64) -> int:
    """A power-of-two tile of `dim` such that tile * whole stays near _RECURRENT_TILE."""
    return max(lo, min(hi, next_pow2(dim), _RECURRENT_TILE // whole))


# Triton 3.6 miscompiles the forward chunk kernels at chunk 64 with 8 warps on the H100 (docs/design.md,
# "Tuning design"): outputs off by up to 0.5 in rows that change from run to run, or illegal memory
# accesses, at M from 5 to 100. 4 warps of the same tiles, and chunk 32 at either warp count, were
# right in every config tried. No config with this combination is launched.
_MISCOMPILED_AT_CHUNK_64 = ("chunk_fwd", "chunk_fwd_compact")


def miscompiled(kernel: str, cfg: dict, BT: int | None) -> bool:
    """Whether `cfg` is a known Triton 3.6 miscompile of `kernel` at chunk size BT (see above)."""
    return kernel in _MISCOMPILED_AT_CHUNK_64 and (BT or 32) > 32 and cfg.get("num_warps") == 8


def _safe(kernel: str, cfg: dict, BT: int | None) -> dict:
    """cfg, with 4 warps where 8 would be a known miscompile (the tiles and stages are kept)."""
    return dict(cfg, num_warps=4) if miscompiled(kernel, cfg, BT) else cfg


def default_config(kernel: str, K: int, V: int, M: int, BT: int | None = None, seqs: int | None = None) -> dict:
    """`_default_config`, memoized (a pure function of its arguments and the GPU's SM count): an
    untuned shape looks its configs up on every launch. A fresh dict each call, for callers to edit."""
    return dict(_default_config(kernel, K, V, M, BT, seqs))


@functools.lru_cache(maxsize=4096)
def _default_config(kernel: str, K: int, V: int, M: int, BT: int | None, seqs: int | None) -> dict:
    """A sound config for any shape, from measurements on the H100 (docs/design.md, "Tuning design").

    Chunk 32 with 4 warps everywhere: the chunk kernels are latency-bound, and two small programs per
    SM hide each other's loads better than one large one. Register tiles scale down as the slot
    dim grows (a [BK, BM] float32 state tile must stay near 8K elements). The state walks run several
    programs per sequence-head (kernels/states.py): with few sequence-heads (seqs = N*H) a program per
    tile of each memory (SPLIT) fills the GPU, with many a program per pair of tiles shares the loads.
    """
    if kernel.startswith("recurrent_") or kernel == "decode":
        return _recurrent_default(kernel, K, V, M, seqs)
    BM = pow2_at_least(M)
    BT = BT or 32
    BK = min(128, pow2_at_least(K), max(16, 8192 // BM))
    BV = min(128, pow2_at_least(V), max(16, 8192 // BM))
    SK, SV = min(64, BK), min(64, BV)
    # The walks are latency-bound chains of one small dot per chunk (H100). Paired programs under one
    # per SM: split them (c forward walk 0.64 -> 0.49 ms). Split programs under two per SM: the
    # backward walk also gains from halved tiles and 3 stages (c 0.48 -> 0.45 ms; 3 stages hold
    # [BT, BM] G and p/dz tiles and a q/do tile: up to 64 KB in float32).
    split = int(seqs is not None and max(cdiv(K, SK), cdiv(V, SV)) * seqs < num_sms())
    deep = 3 if BT * BM <= 4096 else 2      # stages whose [BT, BM] float32 copies fit shared memory
    DK, DV, bwd_stages = SK, SV, 2
    if split and (cdiv(K, SK) + cdiv(V, SV)) * seqs < 2 * num_sms():
        DK, DV, bwd_stages = min(32, SK), min(32, SV), deep
    # The forward walk: `deep` stages keep its G and s copies two chunks ahead (never slower on a-d),
    # and a split program, alone on its SM, gains from 8 warps (c 0.42 -> 0.39 ms)
    cfg = {
        "chunk": {"BT": 32},
        "states_fwd": {"BK": SK, "BV": SV, "SPLIT": split, "SEGMENT": 0, "num_warps": 8 if split else 4,
                       "num_stages": deep},
        "states_bwd": {"BK": DK, "BV": DV, "SPLIT": split, "SEGMENT": 0, "num_warps": 4,
                       "num_stages": bwd_stages},
        "chunk_fwd": {"BK": BK, "BV": BV, "num_warps": 4, "num_stages": 3},
        # H100, shape c: the compact walk is fastest at 4 warps (split 64-tiles, 3 stages: 0.384 ms
        # against 0.417 at 8); a, d keep their paired 4-warp walk
        "states_fwd_compact": {"BK": SK, "BV": SV, "SPLIT": split, "SEGMENT": 0, "num_warps": 4,
                               "num_stages": deep},
        "chunk_fwd_compact": {"BK": BK, "BV": BV, "num_warps": 4, "num_stages": 3},
        "chunk_bwd_dscores": {"BV": min(32, BV), "num_warps": 4, "num_stages": 3},
        "chunk_bwd_keys": {"BK": min(64, BK), "num_warps": 4, "num_stages": 3},
        "chunk_bwd_values": {"BV": min(64, BV), "num_warps": 4, "num_stages": 3},
    }[kernel]
    if (BT > 32 or BM >= 128) and kernel.startswith("chunk_"):
        # larger chunks or slot dims hold 2-4x the [BT, BT] and [BT, BM] tiles: more warps, narrower
        # K/V tiles
        # (and fewer stages: chunk 64 in float32 needs 295 KB of shared memory at M 128 with 3 stages,
        # 233 KB at M 256 with 2; the H100 has 227 KB)
        cfg["num_warps"] = 8
        cfg["num_stages"] = 1 if (BT > 32 and BM >= 256) else min(cfg["num_stages"], 2)
        cap = 32 if (BT > 32 and BM >= 128) else 64
        for key in ("BK", "BV"):
            if key in cfg:
                cfg[key] = min(cfg[key], cap)
    return _safe(kernel, cfg, BT)


def _recurrent_default(kernel: str, K: int, V: int, M: int, seqs: int | None) -> dict:
    BK, BV, BM = next_pow2(K), next_pow2(V), next_pow2(M)
    DK, DV = decode_tile(K, M, seqs or 1), decode_tile(V, M, seqs or 1)
    cfg = {
        "recurrent_fwd_keys": {"BMS": _tile(BK, M), "num_warps": 4},
        "recurrent_fwd_values": {"BV": _tile(BM, V, lo=8), "num_warps": 4},
        "recurrent_bwd_dp": {"BMS": _tile(BV, M), "num_warps": 4},
        "recurrent_bwd_keys": {"BKS": _tile(BM, K, lo=8), "num_warps": 4},
        "recurrent_bwd_values": {"BVS": _tile(BM, V, lo=8), "num_warps": 4},
        "recurrent_bwd_gates": {"BK": _tile(BM, K, lo=8), "BV": _tile(BM, V, lo=8), "num_warps": 2},
        "decode": {"BK": DK, "BV": DV, "num_warps": decode_warps(DK, DV, M), "PDL": 1},
    }[kernel]
    return dict(cfg)


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
    """Streaming multiprocessors of the current GPU (132 on an H100 SXM; the interpreter uses that)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 132


def decode_tile(D: int, M: int, NH: int) -> int:
    """The decode step's tile of K (or V) rows: one program per tile and (batch, kv head), NH = B * H
    of those. Small tiles while the programs are few (each program reads its tile once, so at small
    batch more, smaller programs put more bytes in flight), 64 rows once 64-row tiles give every SM
    eight programs; at most 8192 // BM rows (a float32 [tile, BM] state tile stays at 32 KB) and at
    least 16. On the H200 (bench_decode --sweep, K = V = 512, M = 64, H = 4): 16 at B = 1 (9.8 us
    against 11.1 with 32), 32 at B = 8 and 16, 64 at B = 64."""
    programs64 = NH * cdiv(D, 64)
    tile = 16 if 2 * programs64 < num_sms() else 32 if programs64 < 8 * num_sms() else 64
    return max(16, min(tile, next_pow2(D), 8192 // next_pow2(M)))


def decode_warps(BK: int, BV: int, M: int) -> int:
    """One warp per 4096 elements of the larger state tile: one warp was fastest on the H200 for
    tiles up to [64, 64] at every batch size (B = 64: 43.9 us against 46.5 with four)."""
    return max(1, min(8, max(BK, BV) * next_pow2(M) // 4096))


def walk_segment_chunks(segment: int, programs: int, chunks: int) -> int:
    """Chunks per segment of a state walk (0: walk each sequence whole) for its config value
    `segment`, `programs` the one-level walk's programs (tiles x sequence-heads) and `chunks` the
    chunks of a sequence (varlen: of the longest there could be, all tokens in one).

    segment 1 means one level; L >= 2 means segments of L chunks (one level when a sequence has no
    more). 0 picks from the work: one level unless the one-level walk leaves at least half the SMs
    without a program; then at most two programs per SM (one wave), the segments no shorter than 16 chunks and
    shorter than half a sequence. The two-level walk walks every chunk twice, so its serial chain is
    two segments long and its work twice the walk's: on the H200 it took [1, 32768, 4, 512, 64]
    from 1.93 to 1.05 ms forward (with paired tiles; longer segments were faster: 128 chunks over 64
    and 32), and lost 8% at [2, 8192, 4, 512, 64] (128 programs at one level) and 30-40% where the
    GPU was full (docs/history/perf-notes.md, "v15")."""
    if segment == 0:
        sms = num_sms()
        if 2 * programs > sms:
            return 0
        segments = max(2, 2 * sms // max(programs, 1))     # all in one wave: a second wave doubles the time
        segment = max(16, cdiv(chunks, segments))
        if 2 * segment >= chunks:
            return 0
    if segment == 1 or segment >= chunks:
        return 0
    return segment


# Checkpoint level 2 keeps the chunk state at the start of every segment of this many tokens where the
# rebuilt walk would leave the GPU idle, so that the backward rebuilds the chunk states with segments
# walked side by side from those starts (one walk's work, a chain of one segment) instead of a walk of
# each whole sequence. The starts cost 1 / L of level 0's float32 states (L = chunks per segment): at
# 1024 tokens and chunk 32, 1/32.
RECOMPUTE_SEGMENT_TOKENS = 1024


def recompute_segment_chunks(BT: int, seq_heads: int, K: int, V: int) -> int:
    """Chunks per segment (at least 2) of checkpoint level 2's rebuilt state walk for chunk size BT and
    seq_heads = N * H walks, or 0: keep no states and rebuild them by walking each sequence from its
    start. Segments only while the one-level walk (at 64-row tiles, keys' and values' apart) has fewer
    than two programs per SM: there the walk's chain of chunk steps is what it costs, and the copy of
    the starts is small; where the walk fills the GPU, segments save nothing and the copy is paid
    (H200, level 2 fwd+bwd: [2, 8192, 4, 512, 64], 128 such programs, 2.51 -> 2.40 ms and
    [1, 32768] 5.54 -> 5.37 with segments; [8, 2048], 512 programs, 1.99 -> 2.01, and [32, 512],
    one segment a sequence, 1.28 -> 1.30: docs/history/perf-notes.md, "Session 26"). Not a function
    of T, so that the saved starts' size follows T as the chunk states' does (torch.compile: no guard
    on T)."""
    if seq_heads * (cdiv(K, 64) + cdiv(V, 64)) >= 2 * num_sms():
        return 0
    return max(2, RECOMPUTE_SEGMENT_TOKENS // BT)


def launch_config(kernel: str, *, K: int, V: int, M: int, dtype, BT: int | None = None,
                  tokens: int | None = None, seqs: int | None = None) -> dict:
    """The config `kernel` launches with for this shape; recorded for this thread's `last_launches()`.

    BT is the call's chunk size. tokens = B*T*H and seqs = N*H complete the tuned-file key
    (gsa_kernels/problem_keys.py); without them the lookup takes the nearest entry for (K, V, M, dtype).
    The token-by-token and decode kernels look up the file's recurrent entries (`op: recurrent`) the
    same way, keyed by their own tokens and seqs (the decode step: tokens = seqs = B*H).
    No tuned entry: `default_config` (which also uses seqs to size the state-walk tiles; for the
    decode step seqs = B*H sets its tiles: `decode_tile`). From any source, a known
    miscompile (`miscompiled`) launches with 4 warps instead of 8.
    """
    cfg, source, entry = lookup.lookup(kernel, K=K, V=V, M=M, dtype=dtype, tokens=tokens, seqs=seqs)
    if cfg is None:
        cfg = default_config(kernel, K, V, M, BT, seqs)        # safe already
    else:
        # a tuned entry is keyed by shape, not chunk size: its configs may come from a chunk-32
        # sweep and meet a call's chunk_size=64
        cfg = _safe(kernel, cfg, BT)
    launches.record_launch(kernel, cfg, source, None if entry is None else entry.key,
                           None if entry is None else entry.triton)
    return cfg


def reset():
    """Forget the files read, the selections, the warnings given, what opt-in autotuning remembered,
    the counters and this thread's launch records (tests, or after changing the environment)."""
    tuned_file.reset()
    lookup.reset()
    autotune.reset()
    launches.reset()
