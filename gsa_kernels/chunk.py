"""chunk_gsa: launchers of the chunkwise kernels and the autograd Function that only calls them.

Forward, 3 launches:  chunk_cumsum (G) -> states_fwd (hk, hv at every chunk start, and the final
                      states) -> chunk_fwd (scores, softmax, o per chunk).
Backward, 5 launches: chunk_cumsum (G again, cheaper than keeping it) -> chunk_bwd_dscores (p, dz,
                      dG_loc per chunk) -> states_bwd (dhk, dhv at every chunk end, and the
                      initial-state gradients) -> chunk_bwd_keys (dq, dk, the keys' share of ds)
                      -> chunk_bwd_values (dv, ds, dg).
Saved for the backward: the inputs, the float32 scores [B, T, H, M] and the float32 chunk states.
No host sync anywhere: varlen chunk tables are built on the device with a host-known upper bound.
"""
from __future__ import annotations

import torch

from gsa_kernels import tuned
from gsa_kernels.checks import check_inputs
from gsa_kernels.configs import launch_config
from gsa_kernels.intmath import cdiv, pow2_at_least
from gsa_kernels.kernels.chunk_bwd import chunk_bwd_dscores_kernel, chunk_bwd_keys_kernel, chunk_bwd_values_kernel
from gsa_kernels.kernels.chunk_fwd import chunk_fwd_kernel
from gsa_kernels.kernels.cumsum import chunk_cumsum_kernel
from gsa_kernels.kernels.states import states_bwd_kernel, states_fwd_kernel


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get IEEE float32 dots (the contract is 1e-5); half inputs get tf32 for the dots
    whose operands are float32 intermediates (states, probabilities), which bf16 would round (the
    state walks and chunk_fwd's q Hk do better: kernels/dots.py)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_chunk_slots(B: int, T: int, BT: int, N: int, is_varlen: bool):
    """Chunk slots of the saved states: B * ceil(T / BT); packed (varlen), the host-known bound
    T // BT + N >= sum_n ceil(len_n / BT), so no sync sizes the grid. Also takes symbolic sizes."""
    return T // BT + N if is_varlen else B * ((T + BT - 1) // BT)


def final_state_grads(dhk, dhv, hk_shape, hv_shape, device):
    """The final-state gradients as contiguous float32, a missing one (None, or the empty result of
    a custom op) as zeros; (None, None) when neither is given."""
    absent = lambda x: x is None or x.numel() == 0   # noqa: E731
    if absent(dhk) and absent(dhv):
        return None, None
    f32 = dict(dtype=torch.float32, device=device)
    dhk = torch.zeros(hk_shape, **f32) if absent(dhk) else dhk.float().contiguous()
    dhv = torch.zeros(hv_shape, **f32) if absent(dhv) else dhv.float().contiguous()
    return dhk, dhv


class ChunkLayout:
    """Where every chunk lives: the chunk slots of the saved states, and for varlen the device tables
    (sequence offsets, first slot of each sequence, and (sequence, chunk) of every slot)."""

    def __init__(self, B: int, T: int, BT: int, cu_seqlens: torch.Tensor | None, device):
        self.BT, self.T = BT, T
        self.is_varlen = cu_seqlens is not None
        if not self.is_varlen:
            self.N = B
            self.num_slots = num_chunk_slots(B, T, BT, B, False)
            self.cu = self.chunk_offsets = self.table = None
            return
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        self.N = cu.numel() - 1
        lengths = cu[1:] - cu[:-1]
        chunks = (lengths + BT - 1) // BT
        offsets = torch.zeros(self.N + 1, dtype=torch.int32, device=device)
        offsets[1:] = torch.cumsum(chunks, 0)
        self.num_slots = num_chunk_slots(B, T, BT, self.N, True)
        slot = torch.arange(self.num_slots, dtype=torch.int32, device=device)
        seq = torch.searchsorted(offsets[1:].contiguous(), slot, right=True).to(torch.int32)
        valid = slot < offsets[-1]
        seq_c = seq.clamp(max=self.N - 1)
        within = slot - offsets[seq_c.long()]
        table = torch.stack([torch.where(valid, seq_c, -1), torch.where(valid, within, 0)], 1)
        self.cu, self.chunk_offsets, self.table = cu, offsets, table.to(torch.int32).contiguous()

    def ptrs(self, dummy):
        """(cu_seqlens, chunk_offsets, chunk_table) kernel arguments; a dummy where not varlen."""
        if self.is_varlen:
            return self.cu, self.chunk_offsets, self.table
        return dummy, dummy, dummy


def _grid_states(K, V, cfg, N, H):
    """The state walks: per sequence-head, one program per (Hk tile, Hv tile) pair, or with SPLIT one
    per Hk tile plus one per Hv tile (kernels/states.py)."""
    nk, nv = cdiv(K, cfg["BK"]), cdiv(V, cfg["BV"])
    return (nk + nv if cfg["SPLIT"] else max(nk, nv), N * H)


def _warps(cfg):
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def chunk_gates(g, layout: ChunkLayout):
    """G = within-chunk cumulative sum of g, float32 [B, T, H, M]."""
    B, T, H, M = g.shape
    G = torch.empty(B, T, H, M, dtype=torch.float32, device=g.device)
    cu, _, table = layout.ptrs(g)
    chunk_cumsum_kernel[(layout.num_slots, H)](
        g, G, cu, table, T, H=H, M=M, BT=layout.BT, BM=pow2_at_least(M),
        IS_VARLEN=layout.is_varlen, num_warps=4)
    return G


def chunk_gsa_fwd(q, k, v, s, g, scale, hk0, hv0, output_final_state, layout: ChunkLayout, compact=False):
    """The forward launches. compact (forward-only calls with half inputs): the chunk states as scaled
    float16, half the bytes of float32 at the same precision as the tf32 dots that read them
    (kernels/states.py `_store_scaled`), and no scores (returned as None: nothing will read them)."""
    B, T, H, K = q.shape
    V, M = v.shape[-1], s.shape[-1]
    N, BT, BM = layout.N, layout.BT, pow2_at_least(M)
    prec = dot_precision(q.dtype)
    cu, offsets, table = layout.ptrs(q)
    f32 = dict(dtype=torch.float32, device=q.device)
    states = dict(dtype=torch.float16 if compact else torch.float32, device=q.device)
    hk_chunks = torch.empty(layout.num_slots, H, K, M, **states)
    hv_chunks = torch.empty(layout.num_slots, H, M, V, **states)
    hk_scales = torch.empty(layout.num_slots, H, K, **f32) if compact else q
    hv_scales = torch.empty(layout.num_slots, H, V, **f32) if compact else q
    if layout.is_varlen:
        # the slot count is a bound; the unused slots (all among the last N) are zeroed, so that
        # every output of the op is defined (the custom op returns these states)
        hk_chunks[-N:].zero_()
        hv_chunks[-N:].zero_()
    hk_final = torch.empty(N, H, K, M, **f32) if output_final_state else None
    hv_final = torch.empty(N, H, M, V, **f32) if output_final_state else None
    G = chunk_gates(g, layout)

    suffix = "_compact" if compact else ""
    cfg = launch_config("states_fwd" + suffix, K=K, V=V, M=M, dtype=q.dtype, BT=BT,
                        tokens=B * T * H, seqs=N * H)
    states_fwd_kernel[_grid_states(K, V, cfg, N, H)](
        k, v, s, G, hk0 if hk0 is not None else q, hv0 if hv0 is not None else q,
        hk_chunks, hv_chunks, hk_scales, hv_scales,
        hk_final if output_final_state else q, hv_final if output_final_state else q,
        cu, offsets, T, H=H, K=K, V=V, M=M, BT=BT, BM=BM, BK=cfg["BK"], BV=cfg["BV"],
        SPLIT=cfg["SPLIT"], USE_INITIAL_STATE=hk0 is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=layout.is_varlen, PREC=prec, COMPACT=compact, **_warps(cfg))

    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    scores = None if compact else torch.empty(B, T, H, M, **f32)
    cfg = launch_config("chunk_fwd" + suffix, K=K, V=V, M=M, dtype=q.dtype, BT=BT,
                        tokens=B * T * H, seqs=N * H)
    chunk_fwd_kernel[(layout.num_slots, H)](
        q, k, v, s, G, hk_chunks, hv_chunks, hk_scales, hv_scales, o, q if compact else scores, cu, table,
        scale, T, H=H, K=K, V=V, M=M, BT=BT, BM=BM, BK=cfg["BK"], BV=cfg["BV"],
        IS_VARLEN=layout.is_varlen, PREC=prec, COMPACT=compact, **_warps(cfg))
    return o, scores, hk_chunks, hv_chunks, hk_final, hv_final


def chunk_gsa_bwd(q, k, v, s, g, scale, do, dhk_final, dhv_final, scores, hk_chunks, hv_chunks,
                  layout: ChunkLayout, use_h0: bool):
    B, T, H, K = q.shape
    V, M = v.shape[-1], s.shape[-1]
    N, BT, BM = layout.N, layout.BT, pow2_at_least(M)
    prec = dot_precision(q.dtype)
    cu, offsets, table = layout.ptrs(q)
    f32 = dict(dtype=torch.float32, device=q.device)

    G = chunk_gates(g, layout)
    p = torch.empty(B, T, H, M, **f32)
    dz = torch.empty(B, T, H, M, **f32)
    dG_loc = torch.empty(B, T, H, M, **f32)
    cfg = launch_config("chunk_bwd_dscores", K=K, V=V, M=M, dtype=q.dtype, BT=BT,
                        tokens=B * T * H, seqs=N * H)
    chunk_bwd_dscores_kernel[(layout.num_slots, H)](
        v, s, G, do, hv_chunks, scores, p, dz, dG_loc, cu, table, scale, T,
        H=H, V=V, M=M, BT=BT, BM=BM, BV=cfg["BV"],
        IS_VARLEN=layout.is_varlen, PREC=prec, **_warps(cfg))

    dhk_chunks = torch.empty_like(hk_chunks)
    dhv_chunks = torch.empty_like(hv_chunks)
    dhk0 = torch.empty(N, H, K, M, **f32)
    dhv0 = torch.empty(N, H, M, V, **f32)
    use_dht = dhk_final is not None
    cfg = launch_config("states_bwd", K=K, V=V, M=M, dtype=q.dtype, BT=BT,
                        tokens=B * T * H, seqs=N * H)
    states_bwd_kernel[_grid_states(K, V, cfg, N, H)](
        q, do, dz, p, G, dhk_final if use_dht else q, dhv_final if use_dht else q,
        dhk_chunks, dhv_chunks, dhk0, dhv0, cu, offsets, T,
        H=H, K=K, V=V, M=M, BT=BT, BM=BM, BK=cfg["BK"], BV=cfg["BV"], SPLIT=cfg["SPLIT"],
        USE_FINAL_STATE_GRADIENT=use_dht, IS_VARLEN=layout.is_varlen, PREC=prec, **_warps(cfg))

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    ds, dg = torch.empty_like(s), torch.empty_like(g)
    ds_keys = torch.empty(B, T, H, M, **f32)
    carry_keys = torch.empty(layout.num_slots, H, M, **f32)
    cfg = launch_config("chunk_bwd_keys", K=K, V=V, M=M, dtype=q.dtype, BT=BT,
                        tokens=B * T * H, seqs=N * H)
    chunk_bwd_keys_kernel[(layout.num_slots, H)](
        q, k, s, G, hk_chunks, dhk_chunks, dz, dq, dk, ds_keys, carry_keys, cu, table, T,
        H=H, K=K, M=M, BT=BT, BM=BM, BK=cfg["BK"], IS_VARLEN=layout.is_varlen, PREC=prec, **_warps(cfg))
    cfg = launch_config("chunk_bwd_values", K=K, V=V, M=M, dtype=q.dtype, BT=BT,
                        tokens=B * T * H, seqs=N * H)
    chunk_bwd_values_kernel[(layout.num_slots, H)](
        v, s, G, do, hv_chunks, dhv_chunks, p, dG_loc, ds_keys, carry_keys, dv, ds, dg, cu, table, T,
        H=H, V=V, M=M, BT=BT, BM=BM, BV=cfg["BV"], USE_INITIAL_STATE=use_h0,
        IS_VARLEN=layout.is_varlen, PREC=prec, **_warps(cfg))
    return dq, dk, dv, ds, dg, dhk0, dhv0


class ChunkGSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, s, g, hk0, hv0, scale, output_final_state, layout):
        o, scores, hk_chunks, hv_chunks, hk_final, hv_final = chunk_gsa_fwd(
            q, k, v, s, g, scale, hk0, hv0, output_final_state, layout)
        ctx.save_for_backward(q, k, v, s, g, scores, hk_chunks, hv_chunks)
        ctx.scale, ctx.layout = scale, layout
        ctx.launch_scope = tuned.launch_scope()
        ctx.initial_dtypes = (None if hk0 is None else hk0.dtype, None if hv0 is None else hv0.dtype)
        return o, hk_final, hv_final

    @staticmethod
    def backward(ctx, do, dhk_final, dhv_final):
        q, k, v, s, g, scores, hk_chunks, hv_chunks = ctx.saved_tensors
        do = torch.zeros_like(v, dtype=q.dtype) if do is None else do.contiguous()
        N = ctx.layout.N
        dhk_final, dhv_final = final_state_grads(dhk_final, dhv_final, (N, *hk_chunks.shape[1:]),
                                                 (N, *hv_chunks.shape[1:]), q.device)
        with tuned.in_launch_scope(ctx.launch_scope):
            dq, dk, dv, ds, dg, dhk0, dhv0 = chunk_gsa_bwd(
                q, k, v, s, g, ctx.scale, do, dhk_final, dhv_final, scores, hk_chunks, hv_chunks, ctx.layout,
                use_h0=ctx.initial_dtypes[0] is not None)
        hk_dtype, hv_dtype = ctx.initial_dtypes
        dhk0 = None if hk_dtype is None else dhk0.to(hk_dtype)
        dhv0 = None if hv_dtype is None else dhv0.to(hv_dtype)
        return dq, dk, dv, ds, dg, dhk0, dhv0, None, None, None


def chunk_gsa(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
              **kwargs):
    """Gated Slot Attention by the chunkwise algorithm (SPEC section 2).

    q, k [B, T, H, K]; v [B, T, H, V]; s, g [B, T, H, M]; one dtype among float32 / float16 / bfloat16.
    g is the log forget gate, in [-inf, 0]: -inf resets a slot exactly, and any finite g <= 0 is
    computed as the recurrence does. g > 0 (a decay above 1) is outside GSA's domain and its result
    undefined; GSA_KERNELS_VALIDATE=1 raises a ValueError for it. Returns o [B, T, H, V] in q's dtype
    and (hk [N, H, K, M], hv [N, H, M, V]) float32 final states when output_final_state, else
    (None, None).
    `chunk_size` (keyword: 16, 32 or 64) overrides the tuned chunk length.
    """
    chunk_size = kwargs.pop("chunk_size", None)
    if "head_first" in kwargs:
        raise TypeError("head_first is not supported: inputs are batch-first [B, T, H, D]")
    if kwargs:
        raise TypeError(f"chunk_gsa got unexpected keyword arguments {sorted(kwargs)}")
    problem = check_inputs(q, k, v, s, g, scale, initial_state, cu_seqlens)
    if chunk_size is not None and (chunk_size not in (16, 32, 64)):
        raise ValueError(f"chunk_size must be 16, 32 or 64, got {chunk_size}")
    scale = problem.K ** -0.5 if scale is None else float(scale)
    hk0 = hv0 = None
    if initial_state is not None and any(x is not None for x in initial_state):
        hk0, hv0 = initial_state
        f32 = dict(dtype=torch.float32, device=q.device)
        hk0 = torch.zeros(problem.N, problem.H, problem.K, problem.M, **f32) if hk0 is None else hk0
        hv0 = torch.zeros(problem.N, problem.H, problem.M, problem.V, **f32) if hv0 is None else hv0
    tensors = (q.contiguous(), k.contiguous(), v.contiguous(), s.contiguous(), g.contiguous(),
               None if hk0 is None else hk0.float().contiguous(),
               None if hv0 is None else hv0.float().contiguous())

    if torch.compiler.is_compiling():
        # inside torch.compile: the custom ops of gsa_kernels/ops.py. The chunk size comes from the
        # static dims (ops.compiled_chunk_size) and the kernels' configs are looked up when the graph
        # runs, so a new T does not recompile; opt-in autotuning and the torch_compile backend are
        # eager-only (the graph runs what the tuned file and the user cache already hold)
        from gsa_kernels.ops import chunk_gsa_compiled
        o, hk, hv = chunk_gsa_compiled(*tensors, cu_seqlens, scale, chunk_size or 0, bool(output_final_state))
        return o, (hk, hv)

    sizes = dict(K=problem.K, V=problem.V, M=problem.M, dtype=q.dtype,
                 tokens=problem.B * problem.T * problem.H, seqs=problem.N * problem.H)
    # opt-in (GSA_KERNELS_AUTOTUNE=1) tuning of an untuned shape, then the backend the tuned file chose
    tuned.maybe_autotune(B=problem.B, T=problem.T, H=problem.H, N=problem.N, K=problem.K, V=problem.V,
                         M=problem.M, dtype=q.dtype, device=q.device)
    if tuned.backend_for(tuned.problem_key(**sizes)) == "torch_compile":
        return tuned.compiled_reference()(q, k, v, s, g, scale=scale, initial_state=initial_state,
                                          output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                          chunk_size=chunk_size or 64)
    BT = chunk_size or launch_config("chunk", **sizes)["BT"]
    layout = ChunkLayout(problem.B, problem.T, BT, cu_seqlens, q.device)
    if q.dtype != torch.float32 and not (torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k, v, s, g, hk0, hv0))):
        # forward only: nothing is saved for a backward, so the chunk states can be scaled float16
        o, _, _, _, hk, hv = chunk_gsa_fwd(*tensors[:5], scale, tensors[5], tensors[6], bool(output_final_state),
                                           layout, compact=True)
        return o, (hk, hv)
    o, hk, hv = ChunkGSAFunction.apply(*tensors, scale, bool(output_final_state), layout)
    return o, (hk, hv)
