"""The chunkwise two-pass algorithm of Gated Slot Attention in plain PyTorch, and its compiled form.

`compiled()`, this form under torch.compile, is the backend a tuned entry with `backend:
torch_compile` selects for its shape (the sweep measures it against the Triton kernels).
reference/chunked.py re-exports it beside the naive recurrence and the quadratic form, which
tests/test_reference.py checks it against.

Tokens are grouped in chunks of C. Each chunk sees the past through the states at its start
(Hk, Hv) and its own tokens through masked C x C products, so all the work is batched matmuls.
The states entering the chunks come from a scan of the chunks' affine maps h -> h diag(alpha) + W,
by doubling: log2(#chunks) batched steps (`_chunk_starts`), so that torch.compile traces a graph
whose size does not grow with T (a loop over chunks unrolls: its compile time grew by ~0.2 s a chunk,
minutes at T = 65536). No tensor depends on data for its shape.

Per chunk, with G the within-chunk cumulative sum of g and Gend = G at the last row:

    scores_i = scale * [ e^{G_i} * (q_i Hk) + sum_{j<=i} (q_i . k_j) s_j e^{G_i - G_j} ]
    p_i      = softmax over slots (scores_i)
    o_i      = (p_i * e^{G_i}) Hv + sum_{j<=i} Av_ij v_j,   Av_ij = sum_m p_im s_jm e^{G_im - G_jm}
    Hk'      = Hk * e^{Gend}[None, :] + k^T (s * e^{Gend - G})
    Hv'      = e^{Gend}[:, None] * Hv + (s * e^{Gend - G})^T v

No exponent is ever positive, so nothing overflows for very negative gates. Inside a chunk the
rows are split in sub-chunks of BC = 16: for j in an earlier sub-chunk than i, with r the last row
before i's sub-chunk, e^{G_i - G_j} = e^{G_i - G_r} e^{G_r - G_j} (both factors <= 1), which turns
those blocks into matmuls; the BC x BC diagonal blocks use the exact masked differences.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from gsa_kernels.kernels import cumsum
from gsa_kernels.torch_common import masked_exp, run_per_sequence

SUB_CHUNK = 16
# gates below -FORGET_ALL are summed as -FORGET_ALL, the Triton kernels' rule (kernels/cumsum.py)
FORGET_ALL = float(cumsum.FORGET_ALL.value)
# torch.compile mode of the compiled form (`compiled`) where a tuned entry names none (tuned_file.
# COMPILE_MODES lists those a sweep may name). Never "max-autotune": that mode adds CUDA graphs,
# whose outputs are overwritten by the next call, a contract a drop-in op cannot impose on its
# callers; the sweep times exactly what is dispatched.
COMPILE_MODE = "max-autotune-no-cudagraphs"

_lock = threading.Lock()
_compiled: dict = {}          # mode -> chunk_gsa_torch compiled in it


def _chunk_starts(h0, write, decay):
    """(starts, final): the state entering each chunk [B, H, NT, ...] and the state after the last,
    for h_n = h_{n-1} * decay[n] + write[n] from h0 (decay broadcasts against write's last two dims).

    An inclusive scan by doubling (Hillis-Steele): after the step of width d, (acc[n], dec[n]) is the
    map of chunks max(0, n - 2d + 1) .. n, as (the state it gives from zero, the product of the decays);
    two adjacent maps compose as (acc_a * dec_b + acc_b, dec_a * dec_b). All factors are <= 1."""
    NT = write.shape[2]
    acc, dec, d = write, decay, 1
    while d < NT:
        acc = torch.cat([acc[:, :, :d], acc[:, :, :-d] * dec[:, :, d:] + acc[:, :, d:]], 2)
        dec = torch.cat([dec[:, :, :d], dec[:, :, :-d] * dec[:, :, d:]], 2)
        d *= 2
    after = acc + h0[:, :, None] * dec                                   # the state after each chunk
    return torch.cat([h0[:, :, None], after[:, :, :-1]], 2), after[:, :, -1]


def _chunk_core(q, k, v, s, g, scale, hk0, hv0, C):
    """o [B, T, H, V], hk [B, H, K, M], hv [B, H, M, V] for B independent sequences of one length."""
    B, T, H, K = q.shape
    V, M = v.shape[-1], s.shape[-1]
    if T == 0:
        return q.new_zeros(B, 0, H, V), hk0, hv0
    BC = min(SUB_CHUNK, C)
    NT, NC = -(-T // C), C // BC
    pad = NT * C - T

    # [B, T, H, D] -> [B, H, NT, C, D], zero-padded in front: with g = 0 and s = 0 the padding
    # leaves the states unchanged, and being in front it leaves the last real row at the end of its
    # chunk, where Gend - G is exactly 0 (a padded tail would send dg a rounding residue instead)
    def to_chunks(x):
        x = F.pad(x.transpose(1, 2), (0, 0, pad, 0))
        return x.reshape(B, H, NT, C, x.shape[-1])

    q, k, v, s, g = (to_chunks(x) for x in (q, k, v, s, g))
    # gates below -FORGET_ALL act as -FORGET_ALL: exp of any decay across one is then 0 in float32, as
    # exp(g) is, and g = -inf (a reset) no longer turns the sum into -inf - -inf = NaN; the same rule
    # as the Triton kernels', so that this form serves as their backend
    G = torch.where(g < -FORGET_ALL, -FORGET_ALL, g).cumsum(-2)          # [B, H, NT, C, M], <= 0
    gend = G[..., -1, :]                                                 # [B, H, NT, M]

    # ---- states at every chunk start: a scan over the chunks
    pos = torch.arange(C, device=G.device)
    # each row's write decayed to the chunk end (the last row's difference is exactly 0)
    tail = s * masked_exp(gend[..., None, :] - G, unit=(pos == C - 1)[:, None])
    hk_write = k.transpose(-1, -2) @ tail                                # [B, H, NT, K, M]
    hv_write = tail.transpose(-1, -2) @ v                                # [B, H, NT, M, V]
    alpha = gend.exp()                                                   # chunk-wide decay per slot
    hk_starts, hk = _chunk_starts(hk0, hk_write, alpha[..., None, :])    # [B, H, NT, K, M]
    hv_starts, hv = _chunk_starts(hv0, hv_write, alpha[..., :, None])    # [B, H, NT, M, V]

    # ---- intra-chunk decays, by sub-chunk a (rows a*BC .. a*BC+BC-1)
    Gsub = G.reshape(B, H, NT, NC, BC, M)
    # G at the reference row r(a) = a*BC - 1; for a = 0 the chunk start, where G = 0
    Gref = torch.cat([G.new_zeros(B, H, NT, 1, M), Gsub[:, :, :, :-1, -1, :]], 3)  # [B, H, NT, NC, M]
    # e^{G_i - G_r} for i in sub-chunk a                                   [B, H, NT, NC, BC, M]
    head = (Gsub - Gref[..., None, :]).exp()
    # s_j e^{G_r - G_j} for j <= r(a), 0 for j in sub-chunk a or later    [B, H, NT, NC, C, M]
    earlier = pos[None, :] < pos[::BC, None]                             # [NC, C]
    carry = s[:, :, :, None] * masked_exp(Gref[..., None, :] - G[:, :, :, None], keep=earlier[..., None])
    # s_j e^{G_i - G_j} for i, j in the same sub-chunk, j <= i           [B, H, NT, NC, BC, BC, M]
    causal = torch.ones(BC, BC, dtype=torch.bool, device=G.device).tril()
    diagonal = torch.eye(BC, dtype=torch.bool, device=G.device)
    ssub = s.reshape(B, H, NT, NC, BC, M)
    wdiag = ssub[..., None, :, :] * masked_exp(Gsub[..., :, None, :] - Gsub[..., None, :, :],
                                               keep=causal[..., None], unit=diagonal[..., None])

    # ---- pass 1, keys side: scores over slots
    eG = G.exp()
    qk = q @ k.transpose(-1, -2)                                         # [B, H, NT, C, C], unmasked
    qk_sub = qk.reshape(B, H, NT, NC, BC, C)
    qk_diag = q.reshape(B, H, NT, NC, BC, K) @ k.reshape(B, H, NT, NC, BC, K).transpose(-1, -2)
    # carry is 0 for j not earlier than i's sub-chunk, so the unmasked qk is safe there
    intra = (qk_sub @ carry) * head + torch.einsum("...ij,...ijm->...im", qk_diag, wdiag)
    scores = (q @ hk_starts) * eG + intra.reshape(B, H, NT, C, M)
    p = (scale * scores).softmax(-1)

    # ---- pass 2, values side: read the slots with p
    psub = p.reshape(B, H, NT, NC, BC, M)
    av_off = (psub * head) @ carry.transpose(-1, -2)                     # [B, H, NT, NC, BC, C]
    av_diag = torch.einsum("...im,...ijm->...ij", psub, wdiag)           # [B, H, NT, NC, BC, BC]
    o = ((p * eG) @ hv_starts + av_off.reshape(B, H, NT, C, C) @ v
         + (av_diag @ v.reshape(B, H, NT, NC, BC, V)).reshape(B, H, NT, C, V))
    o = o.reshape(B, H, NT * C, V)[:, :, pad:].transpose(1, 2)
    return o, hk, hv


def chunk_gsa_torch(q, k, v, s, g=None, scale=None, initial_state=None, output_final_state=False,
                    cu_seqlens=None, chunk_size=64):
    """o, (hk, hv) = GSA by the chunkwise algorithm; same contract as naive_recurrent_gsa.

    q, k [B, T, H, K]; v [B, T, H, V]; s, g [B, T, H, M] (g None: ABC mode, gates from s by
    gsa_kernels/abc_gates.py); chunk_size C is 16 or smaller, or a
    multiple of 16 (the sub-chunk). Computed in float64 for float64 inputs, float32 otherwise (the
    slot softmax included); o is returned in q's dtype, the final states in the compute dtype.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1 \
            or chunk_size % min(SUB_CHUNK, chunk_size):
        raise ValueError(f"chunk_size must be a positive int, at most {SUB_CHUNK} or a multiple of "
                         f"{SUB_CHUNK}, got {chunk_size!r}")
    return run_per_sequence(_chunk_core, q, k, v, s, g, scale, initial_state, output_final_state,
                            cu_seqlens, chunk_size)


def compiled(mode: str | None = None):
    """chunk_gsa_torch under torch.compile in `mode` (None: COMPILE_MODE), built once per process
    and mode."""
    mode = mode or COMPILE_MODE
    with _lock:
        if mode not in _compiled:
            _compiled[mode] = torch.compile(chunk_gsa_torch, mode=mode)
        return _compiled[mode]
