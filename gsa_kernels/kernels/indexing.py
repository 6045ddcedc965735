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


@triton.jit
def walk_span(cu_seqlens, chunk_offsets, segment_table, row, T, segment_chunks, H: tl.constexpr,
              BT: tl.constexpr, SEGMENTED: tl.constexpr, IS_VARLEN: tl.constexpr):
    """What state-walk program row `row` walks: (first token, end token of its sequence, first chunk
    slot, number of chunks, head). Not SEGMENTED: row = n * H + h walks sequence n whole. SEGMENTED:
    row = segment * H + h walks one segment, `segment_chunks` chunks of one sequence (fewer at its
    end); segment_table[segment] = (sequence, segment in it) when varlen, sequence -1 (nothing to
    walk) for a padding slot, else the segments of each sequence are numbered in order."""
    h = row % H
    if SEGMENTED:
        segment = row // H
        if IS_VARLEN:
            n = tl.load(segment_table + 2 * segment)
            j = tl.load(segment_table + 2 * segment + 1)
            exists = n >= 0
            n = tl.maximum(n, 0)
        else:
            per_sequence = tl.cdiv(tl.cdiv(T, BT), segment_chunks)
            n, j = segment // per_sequence, segment % per_sequence
            exists = n >= 0
        bos, eos, chunk0 = sequence_span(cu_seqlens, chunk_offsets, n, T, BT, IS_VARLEN)
        first = bos + j.to(tl.int64) * segment_chunks * BT
        num_chunks = tl.minimum(tl.cdiv(eos - first, BT), segment_chunks)
        num_chunks = tl.where(exists, tl.maximum(num_chunks, 0), 0)
        return first, eos, chunk0 + j * segment_chunks, num_chunks, h
    else:
        bos, eos, chunk0 = sequence_span(cu_seqlens, chunk_offsets, row // H, T, BT, IS_VARLEN)
        return bos, eos, chunk0, tl.cdiv(eos - bos, BT), h
