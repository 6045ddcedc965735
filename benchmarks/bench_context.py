"""Decode speed against context length: GSA's fixed-size state against a Transformer's KV cache.

    python -m benchmarks.bench_context [--contexts 512,...,32768] [--batches 1,16] [--new 64] [--json PATH] [--plot PNG]

Two models of the same size (vocabulary 32000, hidden 2048, 4 layers, SwiGLU MLPs of the same width,
RMSNorm, bf16), differing only in the token mixer:
  * GSAModel: 4 heads, 64 slots; its state per sequence is 4 layers x (Hk + Hv), float32, whatever
    the context;
  * a Transformer: 16 heads of 128, causal softmax attention over a preallocated bf16 KV cache
    [B, heads, context + new, 128] per layer (the cache grows with the context; no rotary embedding,
    which adds a few elementwise launches per layer and no cache traffic).
Both decode greedily, each step replayed from a CUDA graph (GSA: layers/generation.py's
GraphedDecoder; the Transformer: one graph per (batch, context) over a device-side position, the
attention masked past it with torch's scaled_dot_product_attention). The context is not prefilled:
the state and the cache hold random values, since a step's time does not depend on them, and a
prefill of 16 x 32768 tokens would only cost time here. Reported: decode tokens/s (batch x new tokens
over the wall time of the replays).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from tuning.measure import cuda_graph

VOCAB, HIDDEN, LAYERS = 32000, 2048, 4


class CachedAttention(nn.Module):
    """Softmax attention of one new token over a static KV cache, written at a device-side position."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x, cache, pos):
        """x [B, 1, hidden]; cache (k, v) [B, heads, L, dim]; pos: the new token's index (0-d int64)."""
        B = x.shape[0]
        q, k, v = self.qkv(x).view(B, 1, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
        kc, vc = cache
        kc.index_copy_(2, pos.view(1), k)
        vc.index_copy_(2, pos.view(1), v)
        seen = torch.arange(kc.shape[2], device=x.device) <= pos
        o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=seen.view(1, 1, 1, -1))
        return self.o_proj(o.transpose(1, 2).reshape(B, 1, -1))


class Transformer(nn.Module):
    def __init__(self, vocab=VOCAB, hidden=HIDDEN, layers=LAYERS, heads=16):
        super().__init__()
        from gsa_kernels.layers.block import SwiGLU
        from gsa_kernels.layers.norms import RMSNorm
        self.embeddings = nn.Embedding(vocab, hidden)
        self.attn_norms = nn.ModuleList(RMSNorm(hidden) for _ in range(layers))
        self.attns = nn.ModuleList(CachedAttention(hidden, heads) for _ in range(layers))
        self.mlp_norms = nn.ModuleList(RMSNorm(hidden) for _ in range(layers))
        self.mlps = nn.ModuleList(SwiGLU(hidden) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def step(self, tokens, caches, pos):
        h = self.embeddings(tokens)
        for norm1, attn, norm2, mlp, cache in zip(self.attn_norms, self.attns, self.mlp_norms, self.mlps, caches):
            h = h + attn(norm1(h), cache, pos)
            h = h + mlp(norm2(h))
        return self.lm_head(self.norm(h))[:, -1]


def tokens_per_s(run, B, new):
    run()                               # warm-up (and capture)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return B * new / best


def gsa_rate(model, B, context, new):
    """GSAModel: the graphed decode loop from a random state (its size does not depend on context)."""
    from gsa_kernels.layers.generation import GraphedDecoder
    gen = torch.Generator(device="cuda").manual_seed(context)
    state = []
    for layer in model.layers:
        a = layer.attn
        H, K, V, M = a.num_kv_heads, a.head_k_dim, a.head_v_dim, a.num_slots
        state.append((torch.randn(B, H, K, M, device="cuda", generator=gen) * 0.02,
                      torch.randn(B, H, M, V, device="cuda", generator=gen) * 0.02))
    first = torch.randint(0, VOCAB, (B, 1), device="cuda", generator=gen)

    def step(tokens, st):
        logits, new_state = model(tokens, state=st, use_cache=True)
        return logits[:, -1], new_state
    decoder = GraphedDecoder(step, buckets=(B,))
    return tokens_per_s(lambda: decoder.decode(first, state, new), B, new)


def transformer_rate(model, B, context, new):
    """The Transformer: one CUDA graph per step over a cache of context + new positions."""
    L = context + new
    heads, dim = model.attns[0].heads, model.attns[0].dim
    caches = [tuple(torch.randn(B, heads, L, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
              for _ in model.attns]
    pos = torch.tensor(context, device="cuda")
    tokens = torch.randint(0, VOCAB, (B, 1), device="cuda")

    def body():
        nxt = model.step(tokens, caches, pos).argmax(-1, keepdim=True)
        tokens.copy_(nxt)
        pos.add_(1)

    graph = cuda_graph(body)

    def run():
        pos.fill_(context)
        for _ in range(new):
            graph.replay()
    return tokens_per_s(run, B, new)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for B in sorted({r["B"] for r in rows}):
        for model, style in (("gsa", "-o"), ("transformer", "--s")):
            pts = [(r["context"], r[f"{model}_tokens_per_s"]) for r in rows if r["B"] == B]
            ax.plot(*zip(*pts), style, label=f"{'GSA' if model == 'gsa' else 'Transformer (KV cache)'}, B={B}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Decode, 4 layers, hidden 2048, bf16, {torch.cuda.get_device_name()}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="512,1024,2048,4096,8192,16384,32768")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new", type=int, default=64, help="decode steps timed per point")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_context needs a CUDA GPU")
    from gsa_kernels.layers import GSAModel
    torch.manual_seed(0)
    with torch.no_grad():
        gsa = GSAModel(VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=4, num_slots=64).to("cuda", torch.bfloat16).eval()
        tf = Transformer().to("cuda", torch.bfloat16).eval()
        params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("gsa", gsa), ("transformer", tf))}
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; parameters: GSA {params['gsa'] / 1e6:.0f} M, "
              f"Transformer {params['transformer'] / 1e6:.0f} M; {args.new} new tokens per point", flush=True)
        rows = []
        for B in map(int, args.batches.split(",")):
            for context in map(int, args.contexts.split(",")):
                row = {"B": B, "context": context, "gsa_tokens_per_s": gsa_rate(gsa, B, context, args.new),
                       "transformer_tokens_per_s": transformer_rate(tf, B, context, args.new)}
                rows.append(row)
                print(f"B={B:3d} context {context:6d}: GSA {row['gsa_tokens_per_s']:9.0f} tokens/s, "
                      f"Transformer {row['transformer_tokens_per_s']:9.0f} tokens/s", flush=True)
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "parameters": params,
                       "new_tokens": args.new, "rows": rows}, fh, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
