"""G: the within-chunk cumulative sum of the log gate g, in float32, computed once per call.

Every other kernel reads G instead of scanning g itself: the state walks stay free of scans, and the
intra-chunk helpers gather partner rows of G straight from memory.

Gates below -FORGET_ALL are summed as -FORGET_ALL. Every decay that crosses such a gate is then
exp(x) with x <= -FORGET_ALL, which is exactly 0 in float32 (below half the smallest subnormal; the
GPU's exp flushes from -87.4 on), as exp(g) of the gate itself is: the kernels compute the same
recurrence. Without the floor, g = -inf gives G = -inf for the rest of the chunk and -inf - -inf = NaN
in every decay, and a huge finite gate (-1e8) swallows the small gates after it in the float32 sum
(their decays come out as exp(0)). With it, G stays within FORGET_ALL per gate of 0 and the gates
after a reset keep float32 precision relative to FORGET_ALL * (resets so far in the chunk). The
gradient of the floor is 0, and so is the true dg of such a gate (exp(g) * anything underflows): the
backward's reverse sum over the rows after it cancels to float32 rounding. NaN gates stay NaN.
"""
import triton
import triton.language as tl

from gsa_kernels.kernels.indexing import chunk_coords

FORGET_ALL = tl.constexpr(104.0)


@triton.jit
def chunk_cumsum_kernel(g, G, cu_seqlens, chunk_table, T, H: tl.constexpr, M: tl.constexpr,
                        BT: tl.constexpr, BM: tl.constexpr, IS_VARLEN: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    t0, nvalid, exists = chunk_coords(cu_seqlens, chunk_table, pid, T, BT, IS_VARLEN)
    if exists:
        t = tl.arange(0, BT)
        m = tl.arange(0, BM)
        mask = (t < nvalid)[:, None] & (m < M)[None, :]
        off = (t0 * H + h) * M + t[:, None] * (H * M) + m[None, :]
        gc = tl.load(g + off, mask=mask, other=0.0).to(tl.float32)
        gc = tl.where(gc < -FORGET_ALL, -FORGET_ALL, gc)      # a comparison with NaN is false: kept
        tl.store(G + off, tl.cumsum(gc, axis=0), mask=mask)
