"""Where a sequence and a chunk live in the flattened token axis (B * T rows, or varlen packed rows)."""
import triton
import triton.language as tl


@triton.jit
def sequence_span(cu_seqlens, chunk_offsets, n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """First token, end token and first chunk slot of sequence n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + n).to(tl.int64)
        eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
        chunk0 = tl.load(chunk_offsets + n).to(tl.int64)
    else:
        bos = n.to(tl.int64) * T
        eos = bos + T
        chunk0 = n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, eos, chunk0


@triton.jit
def chunk_coords(cu_seqlens, chunk_table, pid, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token of chunk `pid`, number of its valid rows, whether it exists); pid is also the
    chunk's state slot. Varlen: chunk_table[pid] = (sequence, chunk in it), sequence -1 for padding."""
    if IS_VARLEN:
        n = tl.load(chunk_table + 2 * pid)
        c = tl.load(chunk_table + 2 * pid + 1)
        exists = n >= 0
        n = tl.maximum(n, 0)
        bos = tl.load(cu_seqlens + n).to(tl.int64)
        eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
    else:
        NT = tl.cdiv(T, BT)
        n, c = pid // NT, pid % NT
        exists = n >= 0
        bos = n.to(tl.int64) * T
        eos = bos + T
    t0 = bos + c * BT
    return t0, eos - t0, exists


@triton.jit
def starts_sequence(chunk_table, pid, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Whether chunk `pid` is the first chunk of its sequence."""
    if IS_VARLEN:
        c = tl.load(chunk_table + 2 * pid + 1)
    else:
        c = pid % tl.cdiv(T, BT)
    return c == 0
