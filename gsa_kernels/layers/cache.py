"""GSACache: the states of a stack of GSA layers between calls, in flash-linear-attention's cache
protocol, so that FLA-style model code can pass it from layer to layer and step to step.

    cache[layer_idx]  -> {"recurrent_state": (hk, hv), "conv_state": (q, k, v) or None, ...}
    len(cache)        -> how many layers have stored a state
    cache.update(recurrent_state=..., conv_state=..., layer_idx=i, offset=tokens)
    cache.get_seq_length(layer_idx=0) -> tokens seen by that layer

FLA's own `fla.models.utils.Cache` follows the same protocol, and the layer accepts either. The
states are those of the layer's `mix` (float32 slot memories [N, H, K, M] and [N, H, M, V], and
with short convolutions their caches [N, D, W]); nothing is copied.
"""
from __future__ import annotations


class GSACache:
    def __init__(self):
        self.states: list[dict] = []
        self._seen: list[int] = []

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int) -> dict:
        if not 0 <= layer_idx < len(self.states):
            raise KeyError(f"the cache holds {len(self.states)} layers' states, no layer {layer_idx}")
        return self.states[layer_idx]

    def __iter__(self):
        return iter(self.states)

    def update(self, recurrent_state=None, attn_state=None, conv_state=None, ffn_state=None,
               layer_idx: int = 0, offset: int = 1, **kwargs) -> dict:
        """Store layer layer_idx's new states (the layers fill the cache in order: a new layer's index
        is len(cache)) after `offset` more tokens; returns its entry."""
        if layer_idx > len(self.states):
            raise ValueError(f"layer_idx {layer_idx} skips layers: the cache holds {len(self.states)}; layers "
                             f"store their states in order, from 0")
        entry = {"recurrent_state": recurrent_state, "attn_state": attn_state, "conv_state": conv_state,
                 "ffn_state": ffn_state}
        if layer_idx == len(self.states):
            self.states.append(entry)
            self._seen.append(0)
        else:
            self.states[layer_idx].update({k: v for k, v in entry.items() if v is not None})
        self._seen[layer_idx] += int(offset)
        return self.states[layer_idx]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens the layer has seen through this cache (0 for a layer with no entry yet)."""
        layer_idx = 0 if layer_idx is None else layer_idx
        return self._seen[layer_idx] if layer_idx < len(self._seen) else 0
