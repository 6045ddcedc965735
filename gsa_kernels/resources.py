"""Whether a launch config fits the GPU: an estimate of its shared memory and registers.

The sweep prunes candidates with it before compiling them, and the lookup takes a nearest tuned entry
only if every config of it fits the problem at hand, so a config tuned for a small M never overflows
at a large one.
"""
from __future__ import annotations

from gsa_kernels.intmath import next_pow2, pow2_at_least
from gsa_kernels.problem_keys import current_arch, dtype_name

# Shared memory per block by arch (bytes), for `fits`; unknown archs and the interpreter get sm90's.
SMEM_BYTES = {"sm80": 166912, "sm86": 101376, "sm87": 166912, "sm89": 101376, "sm90": 232448,
              "sm100": 232448, "sm120": 101376}
# Estimated live float32 values per thread above which a config is pruned: twice the 255-register
# file, so anything pruned would spill at least as much as it keeps (see `fits`).
MAX_REGS_PER_THREAD = 512


def resource_estimate(cfg: dict, *, K: int, V: int, M: int, BT: int, dtype) -> tuple[int, float]:
    """(shared memory bytes, live float32 values per thread) a kernel config is estimated to need.

    Generic, by the naming grammar only (BT chunk, BK/BV tiles of K/V, BM = pow2(M) slots); a
    parameter a kernel does not have counts 0. Per pipelined loop iteration a kernel loads a row tile
    [BT, BK] (or [BT, BV]) of the inputs and a state tile [BK, BM] (or [BM, BV]) in float32; the K and
    V loops of a kernel run one after the other, and Triton keeps num_stages copies in shared memory:
        smem = num_stages * (BT * max(BK, BV) * itemsize + max(BK, BV) * BM * 4)
    (on the H100, chunk_fwd at BT 32, BK = BV = 128, M 64, 3 stages: estimated 123 KB, compiled 98-119 KB).
    The live accumulators of a chunk program are the [BT, BT] intra-chunk matrix, about three
    [BT, BM] score/probability/gate tiles and the two state tiles, spread over 32 * num_warps threads:
        regs = (BT * BT + 3 * BT * BM + BM * (BK + BV)) / (32 * num_warps)
    Both are estimates, not bounds: a config that passes and still fails to compile is caught at
    compile time and rejected there.
    """
    item = 4 if dtype_name(dtype) == "float32" else 2
    BM = pow2_at_least(M)
    BK, BV = cfg.get("BK", 0), cfg.get("BV", 0)
    stages, warps = cfg.get("num_stages", 1), cfg.get("num_warps", 4)
    tile = max(BK, BV)
    smem = stages * (BT * tile * item + tile * BM * 4)
    regs = (BT * BT + 3 * BT * BM + BM * (BK + BV)) / (32 * warps)
    return smem, regs


def fits(cfg: dict, *, K: int, V: int, M: int, BT: int, dtype, arch: str | None = None) -> bool:
    """Whether a config passes the resource estimate on `arch` (default: the present one)."""
    smem, regs = resource_estimate(cfg, K=K, V=V, M=M, BT=BT, dtype=dtype)
    limit = SMEM_BYTES.get(arch or current_arch() or "sm90", SMEM_BYTES["sm90"])
    return smem <= limit and regs <= MAX_REGS_PER_THREAD


# the recurrent kernels' largest float32 register tile, [tile, whole dim], by kernel: (tile params, dim)
_RECURRENT_TILES = {
    "recurrent_fwd_keys": (("BMS",), "K"), "recurrent_fwd_values": (("BV",), "M"),
    "recurrent_bwd_dp": (("BMS",), "V"), "recurrent_bwd_keys": (("BKS",), "M"),
    "recurrent_bwd_values": (("BVS",), "M"), "recurrent_bwd_gates": (("BK", "BV"), "M"),
    "decode": (("BK", "BV"), "M"),
}
# state-tile elements per warp: 128 float32 registers a thread, half the register file's limit
RECURRENT_ELEMENTS_PER_WARP = 4096


def recurrent_fits(kernel: str, cfg: dict, *, K: int, V: int, M: int) -> bool:
    """Whether a token-by-token or decode kernel's config keeps its state tile in registers at these
    dims: the tile [tile, pow2(whole dim)] at most RECURRENT_ELEMENTS_PER_WARP per warp. (These kernels
    hold no shared-memory tiles; an oversized tile spills rather than fails, so this guards speed.)"""
    params, dim = _RECURRENT_TILES[kernel]
    whole = next_pow2({"K": K, "V": V, "M": M}[dim])
    tile = max(cfg[p] for p in params)
    return tile * whole <= RECURRENT_ELEMENTS_PER_WARP * cfg["num_warps"]
