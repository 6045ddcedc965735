"""GSAModel: a small causal language model of GSABlocks, with a generation loop over the state cache."""
from __future__ import annotations

import torch
from torch import nn

from gsa_kernels.distributed import all_ranks_sum, next_rank_first
from gsa_kernels.layers import _args
from gsa_kernels.layers.block import GSABlock
from gsa_kernels.layers.generation import GraphedDecoder, sample
from gsa_kernels.layers.loss import linear_cross_entropy
from gsa_kernels.layers.norms import RMSNorm


class GSAModel(nn.Module):
    """embeddings -> num_layers x GSABlock -> norm -> lm_head.

    The cache is a list with one (hk, hv) state per layer, float32, [B, H, K, M] and [B, H, M, V]:
    its size does not grow with the sequence. Keyword arguments other than those below go to every
    block (and through it to GatedSlotAttention: num_kv_heads, expand_k, gate_logit_normalizer, ...).
    """

    def __init__(self, vocab_size: int, hidden_size: int = 1024, num_layers: int = 2, num_heads: int = 4,
                 num_slots: int = 64, norm_eps: float = 1e-6, tie_word_embeddings: bool = False,
                 context_parallel_group=None, **block_kwargs):
        super().__init__()
        # the embedding table is built before any block, which checks the other sizes
        vocab_size = _args.integer("vocab_size", vocab_size, minimum=1)
        hidden_size = _args.integer("hidden_size", hidden_size, minimum=1)
        num_layers = _args.integer("num_layers", num_layers, minimum=1)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.context_parallel_group = context_parallel_group
        self.embeddings = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(
            GSABlock(hidden_size, num_heads=num_heads, num_slots=num_slots, norm_eps=norm_eps, layer_idx=i,
                     context_parallel_group=context_parallel_group, **block_kwargs) for i in range(num_layers))
        self.norm = RMSNorm(hidden_size, eps=norm_eps)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        if tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight

    def forward(self, input_ids: torch.Tensor, state=None, use_cache: bool = False, cu_seqlens=None,
                attention_mask=None, labels: torch.Tensor | None = None, ignore_index: int = -100):
        """logits [B, T, vocab] (float32) and the new per-layer states when use_cache (else None).

        With labels [B, T] (token ids, ignore_index where a token has no target): the mean
        next-token cross-entropy instead of the logits, (loss, state), computed in chunks of tokens
        without forming the logits (layers/loss.py). As in FLA's and Hugging Face's causal LMs the
        labels are aligned with input_ids and shifted here: position t is scored on labels[t + 1]
        (mark padding, and with cu_seqlens each sequence's first token, as ignore_index).

        context_parallel_group (constructor): every rank feeds its slice of the same sequences
        (gsa_kernels/distributed.py) and its slice of their labels; the last token of a slice is scored
        on the next rank's first label. Each rank's loss is its share of the mean over all ranks'
        labelled tokens, so the ranks' losses sum to the whole batch's mean and so do their parameter
        gradients: sum them over the group (DDP over these ranks averages: scale the loss by the
        group's size first).
        """
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state has {len(state)} layer entries, the model has {len(self.layers)} layers")
        if labels is not None and tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(f"labels (shape {tuple(labels.shape)}) must have input_ids' shape "
                             f"{tuple(input_ids.shape)}")
        h = self.embeddings(input_ids)
        new_state = []
        for i, layer in enumerate(self.layers):
            h, layer_state = layer(h, state=None if state is None else state[i], use_cache=use_cache,
                                   cu_seqlens=cu_seqlens, attention_mask=attention_mask)
            new_state.append(layer_state)
        h = self.norm(h)
        new_state = new_state if use_cache else None
        if labels is not None:
            cp = self.context_parallel_group
            last = (torch.full_like(labels[:, :1], ignore_index) if cp is None
                    else next_rank_first(labels, cp, fill=ignore_index))
            shifted = torch.cat([labels[:, 1:], last], 1)
            loss = linear_cross_entropy(h, self.lm_head.weight, shifted, ignore_index)
            if cp is not None:     # this rank's share of the mean over every rank's labelled tokens
                here = (shifted != ignore_index).sum()
                share = here.float() / all_ranks_sum(here, cp).clamp(min=1).float()
                loss = torch.where(here > 0, loss * share, torch.zeros_like(loss))
            return loss, new_state
        return self.lm_head(h).float(), new_state

    @classmethod
    def from_fla(cls, config, state_dict: dict | None = None) -> "GSAModel":
        """The GSAModel of a flash-linear-attention GSAForCausalLM: its GSAConfig (the object, or the
        dict of a checkpoint's config.json) mapped to our arguments, and its state dict loaded when
        given (`load_fla_state_dict`). FLA options this model does not have (hybrid attention
        layers, attention residuals, gate clamps, an activation other than swish) are refused by name."""
        cfg = dict(config) if isinstance(config, dict) else dict(getattr(config, "__dict__", {}))
        for name, absent in (("attn", None), ("attnres_block_size", None), ("clamp_min", None),
                             ("clamp_max", None)):
            if cfg.get(name, absent) is not absent:
                raise ValueError(f"FLA's {name}={cfg[name]!r} has no counterpart in GSAModel")
        if cfg.get("hidden_act", "swish") not in ("swish", "silu"):
            raise ValueError(f"FLA's hidden_act={cfg['hidden_act']!r}: GSAModel's MLP is SwiGLU (swish)")
        pick = lambda *names, default=None: next((cfg[n] for n in names if cfg.get(n) is not None), default)  # noqa: E731
        model = cls(vocab_size=pick("vocab_size", default=32000), hidden_size=pick("hidden_size", default=2048),
                    num_layers=pick("num_hidden_layers", default=24), num_heads=pick("num_heads", default=4),
                    num_slots=pick("num_slots", default=64), norm_eps=pick("norm_eps", default=1e-6),
                    tie_word_embeddings=bool(pick("tie_word_embeddings", default=False)),
                    hidden_ratio=pick("hidden_ratio", default=4), intermediate_size=pick("intermediate_size"),
                    num_kv_heads=pick("num_kv_heads"), expand_k=pick("expand_k", "exapnd_k", default=1.0),
                    expand_v=pick("expand_v", "exapnd_v", default=1.0),
                    use_short_conv=bool(pick("use_short_conv", default=False)), conv_size=pick("conv_size", default=4),
                    feature_map=pick("feature_map", default="swish"),
                    use_output_gate=bool(pick("use_output_gate", default=False)),
                    use_norm=bool(pick("use_norm", default=True)),
                    gate_logit_normalizer=pick("gate_logit_normalizer", default=8),
                    elementwise_affine=bool(pick("elementwise_affine", default=True)))
        if state_dict is not None:
            model.load_fla_state_dict(state_dict)
        return model

    def load_fla_state_dict(self, state_dict: dict):
        """Load a flash-linear-attention GSAForCausalLM state dict: its keys are ours under `model.`
        (embeddings, layers.i.attn_norm / attn.* / mlp_norm / mlp.gate_proj, up_proj, down_proj, norm)
        plus `lm_head.weight` (absent when the embeddings are tied). Every key must match: a missing or
        unexpected one is a ValueError naming it."""
        ours = {}
        for key, value in state_dict.items():
            ours[key[len("model."):] if key.startswith("model.") else key] = value
        if "lm_head.weight" not in ours and self.lm_head.weight is self.embeddings.weight:
            ours["lm_head.weight"] = ours.get("embeddings.weight")
        missing = sorted(set(self.state_dict()) - set(ours))
        unexpected = sorted(set(ours) - set(self.state_dict()))
        if missing or unexpected:
            raise ValueError(f"the FLA state dict does not fit this GSAModel: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]} (keys without `model.`)")
        self.load_state_dict(ours)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask=None,
                 temperature: float = 0.0, generator: torch.Generator | None = None,
                 eos_token_id: int | None = None, cuda_graphs: bool | None = None) -> torch.Tensor:
        """Prompt [B, T] -> [B, T + n] tokens: one prefill pass over the prompt, then one decode step
        per new token on the cached states. The prompt is returned as given (padding included) with
        the n new tokens appended, n <= max_new_tokens.

        input_ids: int64 or int32 token ids [B, T], T >= 1, each in [0, vocab_size).
        max_new_tokens: an integer >= 0 (0 returns the prompt unchanged, after the prefill pass).
        attention_mask: None (every token is real) or [B, T], nonzero for a real token and 0 for
            padding, on any side of a row. Rows may have different numbers of real tokens, but each
            row needs at least one: a row of zeros has nothing to condition on, so it is an error
            naming that row rather than a sample from an empty prompt. Drop such rows (or give them a
            token, e.g. BOS) before the call.
        temperature: a finite number >= 0. 0 (the default) means greedy decoding (argmax); above 0,
            tokens are sampled from softmax(logits / temperature), with `generator` if given.
        eos_token_id: None, or a token id in [0, vocab_size). A row that emits it keeps emitting it;
            generation stops early once every row has.
        cuda_graphs: replay each decode step from a CUDA graph (layers/generation.py: the step, the
            sampling and the state update in one replay, the batch padded to a power-of-two bucket;
            each bucket's graph is captured on its first use and kept with the model). The graphs
            sample by Gumbel-max from the device's default generator (the same distribution as the
            eager loop's, another stream of draws), so `generator` needs the eager loop. Greedy
            tokens are the eager loop's. Off CUDA, True runs the same static-buffer loop without
            graphs. None (the default) means graphs on CUDA (5.6x the eager loop's tokens/s at B = 1
            on an H200), unless a `generator` is given for sampling; the eager loop elsewhere.

        Every argument is checked before the prefill pass; a bad one raises a ValueError naming it.
        """
        self._check_generate_args(input_ids, max_new_tokens, attention_mask, temperature, eos_token_id)
        if cuda_graphs is None:
            cuda_graphs = input_ids.is_cuda and not (temperature > 0 and generator is not None)
        if cuda_graphs and temperature > 0 and generator is not None:
            raise ValueError("cuda_graphs=True samples from the device's default generator: pass "
                             "generator=None, or cuda_graphs=False to sample with this generator")
        temperature = float(temperature)
        logits, state = self(input_ids, use_cache=True, attention_mask=attention_mask)
        if attention_mask is not None:
            # each row's last kept token (the prompt may be right-padded); nonzero means kept, as in the layers
            last = attention_mask.bool().long().cumsum(1).argmax(1)
            next_logits = logits[torch.arange(logits.shape[0], device=logits.device), last]
        else:
            next_logits = logits[:, -1]
        if cuda_graphs and max_new_tokens > 0:
            first = sample(next_logits, temperature if temperature > 0 else None)
            rest = self._graphed_decoder().decode(first, state, max_new_tokens - 1, temperature, eos_token_id)
            return torch.cat([input_ids, first.to(input_ids.dtype), rest.to(input_ids.dtype)], 1)
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

    def _graphed_decoder(self) -> GraphedDecoder:
        """This model's decode graphs, made again if its parameters moved (a graph replays the
        addresses it was captured with: after .to() or .half() those are gone)."""
        where = tuple(p.data_ptr() for p in self.parameters())
        if getattr(self, "_decoder_params", None) != where:
            def step(tokens, state):
                logits, new_state = self(tokens, state=state, use_cache=True)
                return logits[:, -1], new_state
            self._decoder, self._decoder_params = GraphedDecoder(step), where
        return self._decoder

    def _check_generate_args(self, input_ids, max_new_tokens, attention_mask, temperature, eos_token_id):
        """generate's argument checks (see its docstring). Reads the ids and the mask on the host, one
        sync each, before a prefill pass that syncs anyway: an out-of-range id would otherwise be an
        IndexError from the embedding on the CPU, a device-side assert that poisons the context on the
        GPU, and an empty row a kernel error about tensors the caller never saw."""
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold int64 or int32 token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids (shape {tuple(input_ids.shape)}) must be 2-D, [batch, tokens]")
        B, T = input_ids.shape
        if T < 1:
            raise ValueError(f"input_ids (shape {tuple(input_ids.shape)}) has no prompt tokens: each row "
                             f"needs at least one token to condition on")
        if B:
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"input_ids must be token ids in [0, vocab_size={self.vocab_size}), "
                                 f"got values in [{lo}, {hi}]")
        _args.integer("max_new_tokens", max_new_tokens, minimum=0)
        _args.real("temperature", temperature, at_least=0, note="0 means greedy")
        if eos_token_id is not None:
            eos = _args.integer("eos_token_id", eos_token_id, minimum=0)
            if eos >= self.vocab_size:
                raise ValueError(f"eos_token_id must be a token id in [0, vocab_size={self.vocab_size}), "
                                 f"got {eos}: no row could ever emit it")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise ValueError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"attention_mask (shape {tuple(attention_mask.shape)}) must have input_ids' "
                                 f"shape {(B, T)}")
            empty = (~attention_mask.bool().any(1)).nonzero().flatten().tolist()
            if empty:
                every = " (every row)" if len(empty) == B else ""
                raise ValueError(f"attention_mask rows {empty}{every} are all padding: each prompt row needs "
                                 f"at least one real token to condition on; drop those rows or give them one")
