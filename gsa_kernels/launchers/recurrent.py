"""Launchers of the token-by-token kernels (kernels/recurrent.py) and of the decode step (kernels/decode.py).

recurrent_fwd: 2 launches (scores by slot tiles, then softmax and o by V tiles); recurrent_bwd: 4
(dp, keys side, values side, gates); decode_step: 2 (the keys' memory and the partial
scores by K tiles; the slot softmax, the values' memory and o by V tiles; one token per sequence,
float32 states).

Grouped query heads: q, o, do, dq [.., HQ, .] and the scores [.., HQ, M] per query head; k, v, s, g,
their gradients and the states per kv head [.., H, .], HQ = G * H. Every grid runs over the kv heads
(N * H programs per tile): each program walks its kv head's state once and serves the G query heads
of its group; G (a constexpr) is read from the shapes.
"""
from __future__ import annotations

import torch

from gsa_kernels.configs import launch_config
from gsa_kernels.intmath import cdiv, next_pow2
from gsa_kernels.kernels.decode import decode_keys_kernel, decode_values_kernel
from gsa_kernels.kernels.recurrent import (recurrent_bwd_dp_kernel, recurrent_bwd_gates_kernel,
                                           recurrent_bwd_keys_kernel, recurrent_bwd_values_kernel,
                                           recurrent_fwd_keys_kernel, recurrent_fwd_values_kernel)
from gsa_kernels.launchers.direct import DirectLaunch
from gsa_kernels.launches import this_thread
from gsa_kernels.lookup import epoch as lookup_epoch


def _work(B, T, H, N) -> dict:
    """The tuned-file key's work sizes of a token-by-token call: its grid walks one state per kv head
    and sequence (N * H), over all B * T tokens."""
    return {"tokens": B * T * H, "seqs": N * H}


def recurrent_fwd(q, k, v, s, g, scale, hk0, hv0, hk_final, hv_final, cu_seqlens, N):
    """o [B, T, HQ, V] (q's dtype) and the float32 scores [B, T, HQ, M]; the final states [N, H, ...]
    are written into hk_final / hv_final when those are tensors (they may be hk0 / hv0: every program
    reads its tile of the initial state before it writes the same tile of the final one)."""
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]
    G = HQ // H
    dummy = q
    cu = cu_seqlens if cu_seqlens is not None else dummy
    use_h0, store = hk0 is not None, hk_final is not None
    scores = torch.empty(B, T, HQ, M, dtype=torch.float32, device=q.device)
    o = torch.empty(B, T, HQ, V, dtype=q.dtype, device=q.device)
    flags = dict(USE_INITIAL_STATE=use_h0, STORE_FINAL_STATE=store, IS_VARLEN=cu_seqlens is not None)
    work = _work(B, T, H, N)

    cfg = launch_config("recurrent_fwd_keys", K=K, V=V, M=M, dtype=q.dtype, **work)
    recurrent_fwd_keys_kernel[(cdiv(M, cfg["BMS"]), N * H)](
        q, k, s, g, hk0 if use_h0 else dummy, scores, hk_final if store else dummy, cu, scale, T,
        H=H, G=G, K=K, M=M, BK=next_pow2(K), BMS=cfg["BMS"], num_warps=cfg["num_warps"], **flags)
    cfg = launch_config("recurrent_fwd_values", K=K, V=V, M=M, dtype=q.dtype, **work)
    recurrent_fwd_values_kernel[(cdiv(V, cfg["BV"]), N * H)](
        v, s, g, scores, hv0 if use_h0 else dummy, o, hv_final if store else dummy, cu, T,
        H=H, G=G, V=V, M=M, BM=next_pow2(M), BV=cfg["BV"], num_warps=cfg["num_warps"], **flags)
    return o, scores


def recurrent_bwd(q, k, v, s, g, scores, hk0, hv0, hk_final, hv_final, do, dhk_final, dhv_final,
                  cu_seqlens, scale, N):
    """dq, dk, dv, ds, dg (input dtypes) and dhk0, dhv0 (float32, None without initial states).
    dhk_final / dhv_final: float32 contiguous final-state gradients (then hk_final / hv_final are the
    final states), or both None. With grouped query heads dk, dv, ds, dg and the state gradients sum
    over each group's query heads, inside the kernels."""
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]
    G = HQ // H
    dummy = q
    cu = cu_seqlens if cu_seqlens is not None else dummy
    use_h0, use_dht = hk0 is not None, dhk_final is not None
    varlen = cu_seqlens is not None
    f32 = dict(dtype=torch.float32, device=q.device)
    part_stride = B * T * H * M
    work = _work(B, T, H, N)

    dp = torch.empty(B, T, HQ, M, **f32)
    cfg = launch_config("recurrent_bwd_dp", K=K, V=V, M=M, dtype=q.dtype, **work)
    recurrent_bwd_dp_kernel[(cdiv(M, cfg["BMS"]), N * H)](
        v, s, g, do, hv0 if use_h0 else dummy, dp, cu, T, H=H, G=G, V=V, M=M, BMS=cfg["BMS"], BV=next_pow2(V),
        USE_INITIAL_STATE=use_h0, IS_VARLEN=varlen, num_warps=cfg["num_warps"])

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    ds, dg = torch.empty_like(s), torch.empty_like(g)
    dhk0 = torch.empty(N, H, K, M, **f32) if use_h0 else None
    dhv0 = torch.empty(N, H, M, V, **f32) if use_h0 else None

    cfg_k = launch_config("recurrent_bwd_keys", K=K, V=V, M=M, dtype=q.dtype, **work)
    NK = cdiv(K, cfg_k["BKS"])
    dsk_parts = torch.empty(NK, B, T, H, M, **f32)
    recurrent_bwd_keys_kernel[(NK, N * H)](
        q, k, s, g, scores, dp, hk0 if use_h0 else dummy, dhk_final if use_dht else dummy,
        dq, dk, dsk_parts, dhk0 if use_h0 else dummy, cu, scale, T, part_stride,
        H=H, G=G, K=K, M=M, BKS=cfg_k["BKS"], BM=next_pow2(M), USE_INITIAL_STATE=use_h0,
        USE_FINAL_STATE_GRADIENT=use_dht, IS_VARLEN=varlen, num_warps=cfg_k["num_warps"])

    cfg_v = launch_config("recurrent_bwd_values", K=K, V=V, M=M, dtype=q.dtype, **work)
    NV = cdiv(V, cfg_v["BVS"])
    dsv_parts = torch.empty(NV, B, T, H, M, **f32)
    recurrent_bwd_values_kernel[(NV, N * H)](
        v, s, g, scores, do, dhv_final if use_dht else dummy, dv, dsv_parts, dhv0 if use_h0 else dummy,
        cu, T, part_stride, H=H, G=G, V=V, M=M, BM=next_pow2(M), BVS=cfg_v["BVS"], USE_INITIAL_STATE=use_h0,
        USE_FINAL_STATE_GRADIENT=use_dht, IS_VARLEN=varlen, num_warps=cfg_v["num_warps"])

    cfg = launch_config("recurrent_bwd_gates", K=K, V=V, M=M, dtype=q.dtype, **work)
    recurrent_bwd_gates_kernel[(N * H,)](
        s, scores, dp, dsk_parts, dsv_parts, hk_final if use_dht else dummy, hv_final if use_dht else dummy,
        dhk_final if use_dht else dummy, dhv_final if use_dht else dummy, ds, dg, cu, T, part_stride, NK, NV,
        H=H, G=G, K=K, V=V, M=M, BM=next_pow2(M), BK=cfg["BK"], BV=cfg["BV"], USE_INITIAL_STATE=use_h0,
        USE_FINAL_STATE_GRADIENT=use_dht, IS_VARLEN=varlen, num_warps=cfg["num_warps"])
    return dq, dk, dv, ds, dg, dhk0, dhv0


# (K, V, M, dtype, B * H) -> decode config: the eager decode step skips the lookup after the first
# call, until the lookup forgets its selections (lookup.epoch); never under an override (a sweep)
_decode_configs: dict = {}
_decode_epoch = [0]


def decode_step(q, k, v, s, g, scale, hk0, hv0, hk_new, hv_new, config=None, state_indices=None,
                has_initial_state=None):
    """One token per sequence: o [B, 1, HQ, V]; new states into hk_new / hv_new (None: not stored;
    they may be hk0 / hv0: in place). Inputs contiguous, q [B, 1, HQ, K] and k, v, s, g [B, 1, H, *]
    with HQ a multiple of H (grouped query heads: the states are per kv head, [B, H, ...], each
    updated once for its HQ / H query heads). Two launches (kernels/decode.py): the keys' side by K
    tiles with the partial scores, then the softmax and the values' side by V tiles. `config` (BK, BV,
    num_warps) overrides the default, for tests and sweeps. state_indices [B] (with
    has_initial_state [B] bool): hk0 / hv0 and hk_new / hv_new are state pools [S, H, ...] addressed
    by row (kernels/decode.py, POOLED)."""
    B, _, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], s.shape[-1]
    G, GP, BM = HQ // H, next_pow2(HQ // H), next_pow2(M)
    cfg = config
    if cfg is None:
        key, overridden = (K, V, M, q.dtype, B * H), this_thread.override is not None
        if _decode_epoch[0] != lookup_epoch():
            _decode_configs.clear()
            _decode_epoch[0] = lookup_epoch()
        cfg = None if overridden else _decode_configs.get(key)
        if cfg is None:
            # keyed by the kv heads' states, the decode grid: tokens = seqs = B * H
            cfg = launch_config("decode", K=K, V=V, M=M, dtype=q.dtype, tokens=B * H, seqs=B * H)
            if not overridden:
                _decode_configs[key] = cfg
    pdl = bool(cfg.get("PDL", 1)) and pdl_supported(q.device)
    nkt = cdiv(K, cfg["BK"])
    zpart = torch.empty(nkt, B * H, GP, BM, dtype=torch.float32, device=q.device)
    o = torch.empty(B, 1, HQ, V, dtype=q.dtype, device=q.device)
    use_h0, store, pooled = hk0 is not None, hk_new is not None, state_indices is not None
    flags = dict(H=H, G=G, GP=GP, M=M, BM=BM, USE_INITIAL_STATE=use_h0, STORE_STATE=store, POOLED=pooled,
                 PDL=pdl, num_warps=cfg["num_warps"])
    rows = (state_indices, has_initial_state) if pooled else (q, q)
    # eager, the two launches' host time is most of the step: launched directly once compiled
    _decode_keys((nkt, B * H),
                 q, k, s, g, hk0 if use_h0 else q, hk_new if store else q, zpart, *rows, K=K, BK=cfg["BK"], **flags)
    _decode_values((cdiv(V, cfg["BV"]), B * H),
                   v, s, g, hv0 if use_h0 else q, o, hv_new if store else q, zpart, *rows, scale, V=V, NKT=nkt,
                   NKTP=next_pow2(nkt), BV=cfg["BV"], **flags, **({"launch_pdl": True} if pdl else {}))
    return o


_decode_keys, _decode_values = DirectLaunch(decode_keys_kernel), DirectLaunch(decode_values_kernel)


_pdl: dict = {}


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: CUDA devices of compute capability 9.0 and later (not Triton's
    interpreter, whose tensors are on the CPU)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _pdl:
        _pdl[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _pdl[index]
