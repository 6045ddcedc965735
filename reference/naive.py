"""The step-by-step recurrence of Gated Slot Attention: the ground truth every other form is checked against."""
from __future__ import annotations

import torch

from gsa_kernels.torch_common import compute_dtype, initial_states, sequence_bounds


def naive_recurrent_gsa(q, k, v, s, g=None, scale=None, initial_state=None, output_final_state=False,
                        reverse=False, cu_seqlens=None):
    """o, (hk, hv) = GSA by its recurrence, one token at a time (docs/contract.md, "Math").

    q, k [B, T, H, K]; v [B, T, H, V]; s, g [B, T, H, M]. Computed in float64 for float64 inputs,
    float32 otherwise; o is returned in q's dtype, the final states in the compute dtype.
    g None is ABC mode (FLA 0.6.0), computed here from its definition, step by step and independently
    of gsa_kernels/abc_gates.py: a running log-normaliser z per slot, restarted at every sequence's
    first token (an initial state included); the token writes with the weight exp(s_t - z_t) and
    forgets with exp(z_{t-1} - z_t), nothing at the first token.
    reverse: the recurrence runs from each sequence's last token to its first (FLA's
    fused_recurrent_gsa(reverse=True)); the gates and, in ABC mode, the weights are those of forward
    time; the final states are those after the first token.
    Grouped query heads: q [B, T, HQ, K] with k, v, s, g of H heads, HQ a multiple of H; the query
    heads of a group read their kv head's memory; initial and final states per kv head.
    """
    B, T, H, K = q.shape
    V, M = v.shape[-1], s.shape[-1]
    G = H // k.shape[2]          # grouped query heads: each kv head's memory read by G query heads
    if G > 1:
        k, v, s = (x.repeat_interleave(G, dim=2) for x in (k, v, s))
        g = None if g is None else g.repeat_interleave(G, dim=2)
        if initial_state is not None:
            initial_state = tuple(None if x is None else x.repeat_interleave(G, dim=1) for x in initial_state)
    scale = K ** -0.5 if scale is None else scale
    dt, out_dtype = compute_dtype(q), q.dtype
    abc = g is None
    q, k, v, s = (x.to(dt) for x in (q, k, v, s))
    g = None if abc else g.to(dt)
    bounds = sequence_bounds(B, T, cu_seqlens)
    hk0, hv0 = initial_states(initial_state, len(bounds), H, K, M, V, dt, q.device)

    outputs, final_hk, final_hv = [], [], []
    for n, (b, start, end) in enumerate(bounds):
        # the decay alpha and the write weight of every token, in forward time
        alphas, weights = {}, {}
        z = None                                             # ABC: log sum_{j <= t} exp(s_j) [H, M]
        for t in range(start, end):
            if abc:
                z_new = s[b, t] if z is None else torch.logaddexp(z, s[b, t])
                alphas[t] = torch.ones_like(z_new) if z is None else (z - z_new).exp()
                weights[t] = (s[b, t] - z_new).exp()         # the write weight, in (0, 1]
                z = z_new
            else:
                alphas[t], weights[t] = g[b, t].exp(), s[b, t]   # [H, M]
        hk, hv = hk0[n], hv0[n]                              # [H, K, M], [H, M, V]
        seq_out = {}
        for t in (range(end - 1, start - 1, -1) if reverse else range(start, end)):
            alpha, st = alphas[t], weights[t]
            hk = hk * alpha[:, None, :] + k[b, t, :, :, None] * st[:, None, :]
            hv = hv * alpha[:, :, None] + st[:, :, None] * v[b, t, :, None, :]
            scores = scale * torch.einsum('hk,hkm->hm', q[b, t], hk)
            p = scores.softmax(-1)
            seq_out[t] = torch.einsum('hm,hmv->hv', p, hv)
        outputs.append(torch.stack([seq_out[t] for t in range(start, end)], 0) if seq_out
                       else v.new_zeros(0, H, V))
        final_hk.append(hk)
        final_hv.append(hv)

    if cu_seqlens is None:
        o = torch.stack(outputs, 0)
    else:
        o = torch.cat(outputs, 0)[None]
    o = o.to(out_dtype)
    if not output_final_state:
        return o, (None, None)
    return o, (torch.stack(final_hk, 0)[:, ::G], torch.stack(final_hv, 0)[:, ::G])
