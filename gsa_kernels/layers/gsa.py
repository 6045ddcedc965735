"""GatedSlotAttention: the token mixer of the GSA paper, built on chunk_gsa / fused_recurrent_gsa.

A drop-in for flash-linear-attention's `fla.layers.GatedSlotAttention`: the same constructor
arguments in the same order (`mode` first; unknown keyword arguments are accepted with one warning,
as FLA takes them silently), the same parameter names (`q_proj`, `k_proj`, `v_proj`, `f_proj`,
`q_conv1d`, `k_conv1d`, `v_conv1d`, `g_norm`, `o_proj`: a checkpoint loads as it is) and the same
call, `forward(hidden_states, attention_mask, past_key_values, use_cache, output_attentions)` ->
`(o, None, past_key_values)`, with a cache in FLA's protocol (layers/cache.py). Our state-passing
call, `mix(x, state, use_cache, cu_seqlens, attention_mask)` -> `(y, state)`, is the other view of the
same computation (GSABlock and GSAModel use it):

    q = phi(x W_q)                      [B, T, H, K]        phi: the feature map, swish by default
    k = phi(x W_k),  v = silu(x W_v)    [B, T, H_kv, K / V]
      (with use_short_conv, x W_q, x W_k, x W_v first go through causal depthwise convolutions with
       silu, layers/conv.py, as FLA's)
    g = logsigmoid(x W_f) / gate_logit_normalizer,  s = 1 - exp(g)      [B, T, H_kv, M]
    o = GSA(q, k, v, s, g, scale)       scale 1 (the paper's), over the slot memories; with grouped
                                        kv heads (H_kv < H) each kv head's memory is read by its
                                        H / H_kv query heads inside the kernels
    y = o_proj( RMSNorm(silu(o)) [* silu(x W_g) with use_output_gate] )

Choices (and where they differ from FLA):
  * K = hidden * expand_k / H and V = hidden * expand_v / H per head; num_slots None is FLA's
    default, K. g_norm runs over the whole value dim (FLA's over hidden_size, the same number when
    expand_v = 1).
  * use_output_gate adds `g_proj` (hidden -> value dim) and multiplies the normed output by
    silu(g_proj(x)); FLA stores the flag but never uses it. use_norm=False skips g_norm.
  * Kernel choice: fused_recurrent_gsa for T <= recurrent_threshold (64) outside training (decode
    steps and short prompts); chunk_gsa otherwise (training, long prefill). mode="fused_recurrent"
    forces the token-by-token kernel everywhere (it has a backward too). checkpoint_level (default 2,
    as FLA's op) is chunk_gsa's: 2 rebuilds the chunk states in the backward instead of keeping them.
  * Grouped kv heads: FLA's layer repeats k, v, s, g to the query heads and keeps a state per query
    head; ours passes them to the ops as they are, which keep one memory per kv head (the state and
    its cache are [N, H_kv, ...]: 1 / group of FLA's, and of its walk work).
  * The state: the two slot memories (hk, hv) and, with use_short_conv, the three convolutions'
    caches: `mix` takes and returns (hk, hv) or (hk, hv, (q_cache, k_cache, v_cache)).
  * Padding: `attention_mask` [B, T] (1 keep, 0 pad; left, right or anywhere; with a cache FLA's
    [B, past + T] works too: its last T columns count) packs the kept tokens into one varlen batch
    (one host sync) so padded tokens never enter the memories; their outputs are 0 and each row's
    state is that of its kept tokens. Already-packed input takes `cu_seqlens` (x [1, total, hidden]);
    the state then has one entry per sequence.
  * context_parallel_group (a torch.distributed group, or None): every rank feeds its slice of the
    same B sequences along time, ranks in sequence order (gsa_kernels/distributed.py); the state in
    and out is the whole sequences'. The short convolutions read the previous rank's last conv_size
    inputs (every slice needs at least conv_size tokens); no attention_mask or cu_seqlens there.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from gsa_kernels.chunk import chunk_gsa
from gsa_kernels.distributed import chunk_gsa_cp, preceding_inputs
from gsa_kernels.fused_recurrent import fused_recurrent_gsa
from gsa_kernels.layers import _args
from gsa_kernels.layers.conv import ShortConvolution
from gsa_kernels.layers.fused import gates, rms_norm, rms_norm_linear
from gsa_kernels.layers.norms import RMSNorm

FEATURE_MAPS = {"swish": F.silu, "relu": F.relu, "identity": lambda x: x, None: lambda x: x}


class GatedSlotAttention(nn.Module):
    def __init__(self, mode: str = "chunk", hidden_size: int = 1024, expand_k: float = 1.0, expand_v: float = 1.0,
                 num_heads: int = 4, num_kv_heads: int | None = None, use_short_conv: bool = False,
                 conv_size: int = 4, conv_bias: bool = False, num_slots: int | None = None,
                 elementwise_affine: bool = True, norm_eps: float = 1e-5, gate_logit_normalizer: float = 8.0,
                 feature_map: str | None = "swish", use_output_gate: bool = False, use_norm: bool = True,
                 layer_idx: int | None = None, scale: float | None = 1.0, *, recurrent_threshold: int = 64,
                 checkpoint_level: int = 2, context_parallel_group=None, **kwargs):
        super().__init__()
        if not isinstance(mode, str):
            raise TypeError(f"mode (the first argument, as in flash-linear-attention) must be 'chunk' or "
                            f"'fused_recurrent', got {mode!r}: pass hidden_size=... by keyword")
        if kwargs:
            warnings.warn(f"GatedSlotAttention ignores the arguments {sorted(kwargs)} (accepted for "
                          f"flash-linear-attention's configs, which pass them)", UserWarning, stacklevel=2)
        hidden_size = _args.integer("hidden_size", hidden_size, minimum=1)
        num_heads = _args.integer("num_heads", num_heads, minimum=1)
        num_kv_heads = num_heads if num_kv_heads is None else _args.integer("num_kv_heads", num_kv_heads, minimum=1)
        expand_k = _args.real("expand_k", expand_k, above=0)
        expand_v = _args.real("expand_v", expand_v, above=0)
        # g = logsigmoid(.) / normalizer must stay <= 0, so that each slot's decay exp(g) lies in (0, 1]:
        # 0 would divide by zero (NaN / -inf gates) and a negative one would make every decay exceed 1
        gate_logit_normalizer = _args.real("gate_logit_normalizer", gate_logit_normalizer, above=0,
                                           note="the gate is logsigmoid(x W_f) / gate_logit_normalizer, "
                                                "which must be <= 0")
        if scale is not None:   # None: the kernels' default, K ** -0.5
            scale = _args.real("scale", scale)
        key_dim, value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        if key_dim < num_heads or value_dim < num_heads or key_dim % num_heads or value_dim % num_heads:
            raise ValueError(f"hidden_size * expand_k ({key_dim}) and hidden_size * expand_v ({value_dim}) "
                             f"must be divisible by num_heads ({num_heads}), with at least one key and one "
                             f"value channel per head")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        # FLA's default: as many slots as key channels per head
        num_slots = key_dim // num_heads if num_slots is None else _args.integer("num_slots", num_slots, minimum=1)
        if use_short_conv:
            conv_size = _args.integer("conv_size", conv_size, minimum=1)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(str(k) for k in FEATURE_MAPS)}, got {feature_map!r}")
        if mode not in ("chunk", "fused_recurrent"):
            raise ValueError(f"mode must be 'chunk' or 'fused_recurrent', got {mode!r}")
        if isinstance(checkpoint_level, bool) or checkpoint_level not in (0, 1, 2):
            raise ValueError(f"checkpoint_level must be 0, 1 or 2, got {checkpoint_level!r}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.num_kv_groups = num_heads // num_kv_heads
        self.num_slots, self.key_dim, self.value_dim = num_slots, key_dim, value_dim
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.gate_logit_normalizer, self.feature_map = gate_logit_normalizer, feature_map
        self.use_output_gate, self.use_norm, self.scale = use_output_gate, use_norm, scale
        self.mode, self.recurrent_threshold, self.layer_idx = mode, recurrent_threshold, layer_idx
        self.checkpoint_level, self.use_short_conv, self.conv_size = checkpoint_level, use_short_conv, conv_size
        self.context_parallel_group = context_parallel_group

        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_k_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_v_dim, bias=False)
        self.f_proj = nn.Linear(hidden_size, num_kv_heads * num_slots, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(key_dim, conv_size, bias=conv_bias)
            self.k_conv1d = ShortConvolution(num_kv_heads * self.head_k_dim, conv_size, bias=conv_bias)
            self.v_conv1d = ShortConvolution(num_kv_heads * self.head_v_dim, conv_size, bias=conv_bias)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        if use_norm:
            self.g_norm = RMSNorm(value_dim, elementwise_affine=elementwise_affine, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

    def state_shapes(self, batch_size: int):
        """Shapes of one layer's slot memories (hk, hv): [N, H_kv, K, M] and [N, H_kv, M, V], float32
        (one memory per kv head)."""
        H, K, V, M = self.num_kv_heads, self.head_k_dim, self.head_v_dim, self.num_slots
        return (batch_size, H, K, M), (batch_size, H, M, V)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool = False, output_attentions: bool = False, **kwargs):
        """flash-linear-attention's layer call: (o [B, T, hidden], None, past_key_values).

        past_key_values: a cache in FLA's protocol (GSACache, or FLA's own Cache), read at this layer's
        layer_idx and, with use_cache, updated with its new state; attention_mask [B, T] or, with a
        cache, [B, past + T] (the last T columns); kwargs: cu_seqlens for packed input (others, as
        FLA's position arguments, do not concern GSA and are ignored). No attention weights exist to
        output (output_attentions: the None).
        """
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a [B, T] tensor or None, got {type(attention_mask).__name__}"
                            f" (the state-passing call is layer.mix(x, state))")
        T = hidden_states.shape[1] if hidden_states.dim() == 3 else 0
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] > T:
            attention_mask = attention_mask[:, -T:]
        recurrent_state = conv_state = None
        if past_key_values is not None:
            if self.layer_idx is None:
                raise ValueError("past_key_values needs the layer's layer_idx (its place in the cache): "
                                 "construct GatedSlotAttention(..., layer_idx=i)")
            if len(past_key_values) > self.layer_idx:
                entry = past_key_values[self.layer_idx]
                recurrent_state, conv_state = entry.get("recurrent_state"), entry.get("conv_state")
        y, recurrent_state, conv_state = self._mix(hidden_states, recurrent_state, conv_state, use_cache,
                                                   kwargs.get("cu_seqlens"), attention_mask)
        if past_key_values is not None and use_cache:
            past_key_values.update(recurrent_state=recurrent_state, conv_state=conv_state,
                                   layer_idx=self.layer_idx, offset=T)
        return y, None, past_key_values

    def mix(self, x: torch.Tensor, state=None, use_cache: bool = True, cu_seqlens=None, attention_mask=None,
            input_norm: RMSNorm | None = None):
        """y [B, T, hidden], and the new state when use_cache (else None): the state-passing view.

        state: (hk [N, H, K, M], hv [N, H, M, V]) from the previous call (with use_short_conv:
        (hk, hv, (q_cache, k_cache, v_cache)), the caches [N, D, conv_size]), or None for a fresh
        start. It is only read; the returned state is new tensors. input_norm: a pre-norm block's
        RMSNorm, applied to x here together with the projections (layers/fused.py
        `rms_norm_linear`: the normed x is recomputed in the backward instead of kept).
        """
        recurrent_state = conv_state = None
        if state is not None:
            if self.use_short_conv and len(state) != 3:
                raise ValueError("state of a layer with use_short_conv is (hk, hv, (q_cache, k_cache, v_cache))")
            recurrent_state = tuple(state[:2])
            conv_state = state[2] if self.use_short_conv else None
        y, recurrent_state, conv_state = self._mix(x, recurrent_state, conv_state, use_cache, cu_seqlens,
                                                   attention_mask, input_norm)
        if not use_cache:
            return y, None
        return y, (recurrent_state if not self.use_short_conv else (*recurrent_state, conv_state))

    def _mix(self, x, recurrent_state, conv_state, use_cache, cu_seqlens, attention_mask, input_norm=None):
        """(y, new recurrent state, new conv caches) of both views."""
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x (shape {tuple(x.shape)}) must be [B, T, hidden_size={self.hidden_size}]")
        if cu_seqlens is not None and attention_mask is not None:
            raise ValueError("give either cu_seqlens (packed input) or attention_mask (padded input), not both")
        B, T, _ = x.shape
        cp = self.context_parallel_group
        if cp is not None and (cu_seqlens is not None or attention_mask is not None):
            raise ValueError("a context-parallel layer takes each rank's slice of the same B sequences: "
                             "cu_seqlens and attention_mask are not supported there")
        projections = [self.q_proj, self.k_proj, self.v_proj, self.f_proj]
        if self.use_output_gate:
            projections.append(self.g_proj)
        if input_norm is None:
            q, k, v, f, *gate = (proj(x) for proj in projections)
        else:
            q, k, v, f, *gate = rms_norm_linear(x, input_norm.weight, input_norm.eps, [p.weight for p in projections])

        indices = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask (shape {tuple(attention_mask.shape)}) must be [B, T] = {(B, T)}")
            keep = attention_mask.to(device=x.device).bool()
            if not bool(keep.all()):
                indices = keep.flatten().nonzero().squeeze(1)
                cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=x.device)
                cu_seqlens[1:] = keep.sum(1).cumsum(0)
                q, k, v, f = (t.flatten(0, 1).index_select(0, indices)[None] for t in (q, k, v, f))

        new_conv = None
        if self.use_short_conv:
            caches = (None, None, None) if conv_state is None else conv_state
            convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
            if cp is not None:     # each slice's cache: the previous rank's last inputs (one exchange each)
                edges = [preceding_inputs(t, self.conv_size, cp, None if c is None else c.transpose(1, 2))
                         for t, c in zip((q, k, v), caches)]
                caches = tuple(before.transpose(1, 2) for before, _ in edges)
            (q, cq), (k, ck), (v, cv) = (conv(t, cache=c, output_final_state=use_cache and cp is None,
                                              cu_seqlens=cu_seqlens) for conv, t, c in zip(convs, (q, k, v), caches))
            if cp is not None and use_cache:     # the whole sequences' caches: the last rank's inputs
                cq, ck, cv = (last.transpose(1, 2).contiguous() for _, last in edges)
            new_conv = (cq, ck, cv) if use_cache else None
        q, k, v, s, g = self._kernel_inputs(q, k, v, f)

        # (training first: a compiled training graph then never guards on T)
        recurrent = self.mode == "fused_recurrent" or (not self.training and T <= self.recurrent_threshold)
        if cp is not None:
            op, extra = (fused_recurrent_gsa, {}) if recurrent else (chunk_gsa, {"checkpoint_level": self.checkpoint_level})
            o, new_state = chunk_gsa_cp(q, k, v, s, g, scale=self.scale, initial_state=recurrent_state,
                                        output_final_state=use_cache, group=cp, op=op, **extra)
        elif recurrent:
            o, new_state = fused_recurrent_gsa(q, k, v, s, g, scale=self.scale, initial_state=recurrent_state,
                                               output_final_state=use_cache, cu_seqlens=cu_seqlens)
        else:
            o, new_state = chunk_gsa(q, k, v, s, g, scale=self.scale, initial_state=recurrent_state,
                                     output_final_state=use_cache, checkpoint_level=self.checkpoint_level,
                                     cu_seqlens=cu_seqlens)
        if indices is not None:
            o = o.new_zeros(B * T, self.num_heads, self.head_v_dim).index_copy(0, indices, o[0]).view(B, T, -1, self.head_v_dim)

        o = o.reshape(B, T, self.value_dim)
        if self.use_norm and not self.use_output_gate:   # the normed output recomputed in o_proj's backward
            y, = rms_norm_linear(o, self.g_norm.weight, self.g_norm.eps, [self.o_proj.weight], silu=True)
        else:
            o = rms_norm(o, self.g_norm.weight, self.g_norm.eps, silu=True) if self.use_norm else F.silu(o)
            if self.use_output_gate:
                o = o * F.silu(gate[0])
            y = self.o_proj(o)
        return y, (new_state if use_cache else None), new_conv

    def _kernel_inputs(self, q, k, v, f):
        """q [B', T', H, K] and k, v, s, g [B', T', H_kv, *] from the projections (after the short
        convolutions)."""
        B, T = q.shape[:2]
        phi = FEATURE_MAPS[self.feature_map]
        q = phi(q).view(B, T, self.num_heads, self.head_k_dim)
        k = phi(k).view(B, T, self.num_kv_heads, self.head_k_dim)
        v = F.silu(v).view(B, T, self.num_kv_heads, self.head_v_dim)
        s, g = gates(f, self.gate_logit_normalizer, q.dtype)
        g = g.view(B, T, self.num_kv_heads, self.num_slots)
        s = s.view(B, T, self.num_kv_heads, self.num_slots)
        return q, k, v, s, g
