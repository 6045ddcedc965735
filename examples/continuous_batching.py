"""Continuous batching on a state pool: requests join and leave a running batch between decode steps.

    python -m examples.continuous_batching [--steps 12] [--slots 4] [--check]

What a serving engine does with one GSA layer's pool (hk_pool [S, H, K, M], hv_pool [S, H, M, V],
float32; a model keeps one pair per layer):
  * a request that arrives takes a free slot and is prefilled: the prompts of every new request are
    packed along T (`cu_seqlens`) and run in one `chunk_gsa` call that starts each from zeros
    (`has_initial_state` False: the slot may hold a finished request's state) and writes its final
    state into its slot;
  * every step, the running requests decode one token each in one `fused_recurrent_gsa` call on the
    pool (`inplace=True`): the batch has a fixed size, as a CUDA graph needs, and the rows without a
    request are padding (`state_indices` -1: output 0, nothing written);
  * a request that finishes frees its slot for the next arrival.
No call syncs with the host for the pool: the slot bookkeeping lives on the host, the states never
leave the device. The layer's projections are left out: a request's tokens are random q, k, v, s, g
drawn from its id, so that --check can recompute each request alone, from zeros, over its whole
sequence, and compare every output it was served.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

H, K, V, M = 2, 16, 16, 8


@dataclass
class Request:
    rid: int
    prompt: int            # prompt tokens
    new: int               # tokens to decode after the prompt
    slot: int = -1
    done: int = 0          # tokens decoded so far
    outputs: list = field(default_factory=list)


MAX_TOKENS = 64


def tokens(rid: int, T: int, device, dtype):
    """q, k, v, s, g of request rid's first T tokens [1, T, H, *] (T <= MAX_TOKENS; a prefix of the
    same sequence on every call)."""
    gen = torch.Generator().manual_seed(1000 + rid)
    q, k = (torch.randn(1, MAX_TOKENS, H, K, generator=gen) for _ in range(2))
    v = torch.randn(1, MAX_TOKENS, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(1, MAX_TOKENS, H, M, generator=gen)) / 4
    s = 1 - g.exp()
    return [x[:, :T].to(device, dtype) for x in (q, k, v, s, g)]


def serve(requests, slots: int, batch: int, device, dtype=torch.float32):
    """Runs every request to completion; returns them with their outputs (prefill's o, then one o per
    decoded token)."""
    from gsa_kernels import chunk_gsa, fused_recurrent_gsa
    pools = (torch.zeros(slots, H, K, M, device=device), torch.zeros(slots, H, M, V, device=device))
    free, waiting, running, finished = list(range(slots)), list(requests), [], []
    step = 0
    while waiting or running:
        # admit: new requests take free slots (and a row of the decode batch) and are prefilled together
        admitted = []
        while waiting and free and len(running) + len(admitted) < batch:
            r = waiting.pop(0)
            r.slot = free.pop(0)
            admitted.append(r)
        if admitted:
            parts = [tokens(r.rid, r.prompt, device, dtype) for r in admitted]
            packed = [torch.cat(xs, 1) for xs in zip(*parts)]
            lengths = torch.tensor([0] + [r.prompt for r in admitted])
            cu = lengths.cumsum(0).to(device=device, dtype=torch.int32)
            o, _ = chunk_gsa(*packed, initial_state=pools, cu_seqlens=cu, cu_seqlens_cpu=lengths.cumsum(0),
                             state_indices=torch.tensor([r.slot for r in admitted], device=device),
                             has_initial_state=torch.zeros(len(admitted), dtype=torch.bool, device=device))
            for r, a, b in zip(admitted, cu[:-1].tolist(), cu[1:].tolist()):
                r.outputs.append(o[:, a:b])
            running += admitted
        # decode: one token for every running request, the batch padded to its fixed size
        rows = running + [None] * (batch - len(running))
        step_inputs = [tokens(r.rid, r.prompt + r.done + 1, device, dtype) if r else None for r in rows]
        some = next(ins for ins in step_inputs if ins is not None)
        xs = [torch.cat([ins[i][:, -1:] if ins is not None else torch.zeros_like(some[i][:, -1:])
                         for ins in step_inputs], 0) for i in range(5)]
        idx = torch.tensor([r.slot if r else -1 for r in rows], device=device)
        o, _ = fused_recurrent_gsa(*xs, initial_state=pools, state_indices=idx, inplace=True)
        for n, r in enumerate(rows):
            if r is not None:
                r.outputs.append(o[n:n + 1])
                r.done += 1
        # retire: finished requests free their slots
        for r in [r for r in running if r.done == r.new]:
            running.remove(r)
            free.append(r.slot)
            finished.append(r)
        step += 1
    return finished, step


def check(finished, device, dtype=torch.float32):
    """Every request's served outputs against one call on its whole sequence from zeros; the largest
    relative error."""
    from gsa_kernels import fused_recurrent_gsa
    worst = 0.0
    for r in finished:
        whole, _ = fused_recurrent_gsa(*tokens(r.rid, r.prompt + r.new, device, dtype))
        served = torch.cat(r.outputs, 1)
        err = ((served - whole).norm() / whole.norm()).item()
        worst = max(worst, err)
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--slots", type=int, default=4, help="slots in the state pool")
    ap.add_argument("--batch", type=int, default=3, help="rows of the decode batch (padding included)")
    ap.add_argument("--check", action="store_true", help="compare every request with a call of its own")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")     # Triton's interpreter on a CPU
    device = "cuda" if torch.cuda.is_available() else "cpu"
    requests = [Request(rid, prompt=3 + 5 * rid % 7, new=2 + rid % 4) for rid in range(args.requests)]
    finished, steps = serve(requests, args.slots, args.batch, device)
    print(f"{len(finished)} requests served in {steps} decode steps on {args.slots} slots, "
          f"batches of {args.batch} rows")
    if args.check:
        worst = check(finished, device)
        print(f"largest relative error against each request alone: {worst:.1e}")
        return worst
    return None


if __name__ == "__main__":
    main()
