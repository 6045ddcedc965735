"""GSABlock: pre-norm residual block, GSA token mixer then SwiGLU channel mixer (the paper's layer)."""
from __future__ import annotations

from torch import nn

from gsa_kernels.layers import _args
from gsa_kernels.layers.fused import rms_norm_linear, silu_mul_linear
from gsa_kernels.layers.gsa import GatedSlotAttention
from gsa_kernels.layers.norms import RMSNorm


class SwiGLU(nn.Module):
    """down( silu(gate(x)) * up(x) ); the intermediate size defaults to 2/3 * hidden_ratio * hidden,
    rounded up to a multiple of 256 (as FLA's GatedMLP, whose gate_proj / up_proj / down_proj names
    it shares)."""

    def __init__(self, hidden_size: int, hidden_ratio: float = 4, intermediate_size: int | None = None):
        super().__init__()
        hidden_size = _args.integer("hidden_size", hidden_size, minimum=1)
        if intermediate_size is None:
            hidden_ratio = _args.real("hidden_ratio", hidden_ratio, above=0)
            intermediate_size = int(hidden_size * hidden_ratio * 2 / 3)
            if intermediate_size < 1:   # the rounding below would keep a 0: an MLP that outputs 0
                raise ValueError(f"hidden_ratio ({hidden_ratio}) gives no intermediate channel at hidden_size "
                                 f"{hidden_size}: int(hidden_size * hidden_ratio * 2 / 3) must be >= 1")
            intermediate_size = 256 * ((intermediate_size + 255) // 256)
        else:
            intermediate_size = _args.integer("intermediate_size", intermediate_size, minimum=1)
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x, input_norm: RMSNorm | None = None):
        """input_norm: a pre-norm block's RMSNorm, applied to x with gate_proj and up_proj (the normed x
        is recomputed in the backward instead of kept)."""
        if input_norm is None:
            a, b = self.gate_proj(x), self.up_proj(x)
        else:
            a, b = rms_norm_linear(x, input_norm.weight, input_norm.eps, [self.gate_proj.weight, self.up_proj.weight])
        return silu_mul_linear(a, b, self.down_proj.weight)


class GSABlock(nn.Module):
    """h = x + attn(attn_norm(x));  y = h + mlp(mlp_norm(h)).  Returns (y, state) like the attention.

    Keyword arguments other than those below go to GatedSlotAttention (num_kv_heads, expand_k, ...).
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, num_slots: int = 64, hidden_ratio: float = 4,
                 intermediate_size: int | None = None, norm_eps: float = 1e-6, layer_idx: int | None = None,
                 **attn_kwargs):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(hidden_size, eps=norm_eps)
        # the attention's output norm takes the block's eps unless given its own, as in FLA's blocks
        attn_kwargs.setdefault("norm_eps", norm_eps)
        self.attn = GatedSlotAttention(hidden_size=hidden_size, num_heads=num_heads, num_slots=num_slots,
                                       layer_idx=layer_idx, **attn_kwargs)
        self.mlp_norm = RMSNorm(hidden_size, eps=norm_eps)
        self.mlp = SwiGLU(hidden_size, hidden_ratio, intermediate_size)

    def forward(self, x, state=None, use_cache: bool = True, cu_seqlens=None, attention_mask=None):
        o, state = self.attn.mix(x, state=state, use_cache=use_cache, cu_seqlens=cu_seqlens,
                                 attention_mask=attention_mask, input_norm=self.attn_norm)
        h = x + o
        return h + self.mlp(h, input_norm=self.mlp_norm), state
