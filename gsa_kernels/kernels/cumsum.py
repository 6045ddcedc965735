"""G: the within-chunk cumulative sum of the log gate g, in float32, computed once per call.

Every other kernel reads G instead of scanning g itself: the state walks stay free of scans, and the
intra-chunk helpers gather partner rows of G straight from memory.
"""
import triton
import triton.language as tl

from gsa_kernels.kernels.indexing import chunk_coords


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
        tl.store(G + off, tl.cumsum(gc, axis=0), mask=mask)
