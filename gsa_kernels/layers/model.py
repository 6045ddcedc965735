"""GSAModel: a small causal language model of GSABlocks, with a generation loop over the state cache."""
from __future__ import annotations

import torch
from torch import nn

from gsa_kernels.layers.block import GSABlock
from gsa_kernels.layers.norms import RMSNorm


class GSAModel(nn.Module):
    """embeddings -> num_layers x GSABlock -> norm -> lm_head.

    The cache is a list with one (hk, hv) state per layer, float32, [B, H, K, M] and [B, H, M, V]:
    its size does not grow with the sequence. Keyword arguments other than those below go to every
    block (and through it to GatedSlotAttention: num_kv_heads, expand_k, gate_logit_normalizer, ...).
    """

    def __init__(self, vocab_size: int, hidden_size: int = 1024, num_layers: int = 2, num_heads: int = 4,
                 num_slots: int = 64, norm_eps: float = 1e-6, tie_word_embeddings: bool = False,
                 **block_kwargs):
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.embeddings = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(
            GSABlock(hidden_size, num_heads=num_heads, num_slots=num_slots, norm_eps=norm_eps, layer_idx=i,
                     **block_kwargs) for i in range(num_layers))
        self.norm = RMSNorm(hidden_size, eps=norm_eps)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        if tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight

    def forward(self, input_ids: torch.Tensor, state=None, use_cache: bool = False, cu_seqlens=None,
                attention_mask=None):
        """logits [B, T, vocab] (float32) and the new per-layer states when use_cache (else None)."""
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state has {len(state)} layer entries, the model has {len(self.layers)} layers")
        h = self.embeddings(input_ids)
        new_state = []
        for i, layer in enumerate(self.layers):
            h, layer_state = layer(h, state=None if state is None else state[i], use_cache=use_cache,
                                   cu_seqlens=cu_seqlens, attention_mask=attention_mask)
            new_state.append(layer_state)
        logits = self.lm_head(self.norm(h)).float()
        return logits, (new_state if use_cache else None)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask=None,
                 temperature: float = 0.0, generator: torch.Generator | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Prompt [B, T] -> [B, T + n] tokens: one prefill pass over the prompt, then one decode step
        per new token on the cached states. Greedy when temperature == 0, else sampled from
        softmax(logits / temperature). attention_mask marks prompt padding (any side); a row that
        emits eos_token_id keeps emitting it. Stops early once every row has."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        logits, state = self(input_ids, use_cache=True, attention_mask=attention_mask)
        if attention_mask is not None:
            # each row's last kept token (the prompt may be right-padded)
            last = attention_mask.long().cumsum(1).argmax(1)
            next_logits = logits[torch.arange(logits.shape[0], device=logits.device), last]
        else:
            next_logits = logits[:, -1]
        tokens = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(next_logits / temperature, -1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = next_logits.argmax(-1, keepdim=True)
            if eos_token_id is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt[:, 0] == eos_token_id
            tokens.append(nxt)
            if eos_token_id is not None and bool(done.all()):
                break
            logits, state = self(nxt, state=state, use_cache=True)
            next_logits = logits[:, -1]
        return torch.cat(tokens, 1)
