"""Generation at the GPU's speed: a model's decode step replayed from CUDA graphs.

One decode step of a GSA model is a few dozen small launches (per layer: projections, the decode
kernel, norms, the MLP; then the head and the sampling), each a few microseconds of GPU work, so an
eager loop is bound by the host (GSAModel, 4 layers, hidden 2048, B = 1: 5.3 ms a token on an H200).
`GraphedDecoder` captures the whole step once per batch-size bucket and replays it:

    step(tokens [B, 1], state) -> (logits [B, vocab], new_state)      the model's step (any model)

runs inside the graph on static buffers (the tokens, every tensor of the state), followed by the
sampling (greedy argmax, or Gumbel-max at a temperature: the same distribution as softmax sampling,
with the device's default generator), the end-of-sequence mask, the write of the new token into an
output buffer at a device-side step counter, and the copy of the new state into the static state.
A replay is then the entire token, and the host only launches replays: no per-token tensor work,
no sync except every `check_every` tokens to stop once every row has emitted eos_token_id.

Batches are padded to a bucket (powers of two up to the largest bucket; zeros in the padding rows,
which are computed and dropped) so that a few graphs serve every batch size; a batch above the
largest bucket gets a graph of its own size. The state's structure (nested tuples / lists of
tensors with the batch first, None leaves allowed: the layers' (hk, hv) and their short-convolution
caches) is taken from the first call; graphs are keyed by bucket, sampling mode, eos and that
structure, and share one memory pool.

With `use_graphs=False` (the default off CUDA) the same static-buffer step runs eagerly: the same
code path, checkable on a CPU.
"""
from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature) -> torch.Tensor:
    """Next tokens [B, 1] (int64) from logits [B, vocab]: argmax when temperature is None, else
    Gumbel-max at that temperature (a float or a 0-d tensor > 0): argmax(logits / T + G) with G
    standard Gumbel noise is a draw from softmax(logits / T), and it needs no host sync or
    data-dependent shape, so it can be captured."""
    if temperature is None:
        return logits.argmax(-1, keepdim=True)
    gumbel = -torch.empty_like(logits, dtype=torch.float32).exponential_().log()
    return (logits.float() / temperature + gumbel).argmax(-1, keepdim=True)


def _leaves(tree) -> list:
    """The tensors of a state (nested tuples / lists; None leaves dropped), in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in _leaves(item)]
    if tree is None:
        return []
    raise TypeError(f"a decode state holds tensors, tuples, lists and None, got {type(tree).__name__}")


def _rebuild(tree, leaves):
    """The structure of `tree` with its tensors replaced, in order, by those of the iterator `leaves`."""
    if isinstance(tree, torch.Tensor):
        return next(leaves)
    if isinstance(tree, (tuple, list)):
        return type(tree)(_rebuild(item, leaves) for item in tree)
    return tree


def _signature(tree):
    """The structure and every tensor's shape past the batch, dtype and device: what a graph fixes."""
    if isinstance(tree, torch.Tensor):
        return ("T", tuple(tree.shape[1:]), tree.dtype, str(tree.device))
    if isinstance(tree, (tuple, list)):
        return (type(tree).__name__, tuple(_signature(item) for item in tree))
    return None


class _Replay:
    """The static buffers of one bucket and the step over them (captured, or eager)."""

    def __init__(self, step, state, rows: int, vocab_probe, greedy: bool, eos_token_id, capacity: int,
                 use_graphs: bool, pool, warmup: int):
        device = vocab_probe.device
        self.rows, self.capacity = rows, capacity
        self.state = _rebuild(state, iter([torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=device)
                                           for x in _leaves(state)]))
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.out = torch.zeros(rows, capacity, dtype=torch.long, device=device)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.temperature = torch.ones((), dtype=torch.float32, device=device)
        self.eos = eos_token_id

        def body():
            logits, new_state = step(self.tokens, self.state)
            nxt = sample(logits, None if greedy else self.temperature)
            if self.eos is not None:
                nxt = torch.where(self.done[:, None], torch.full_like(nxt, self.eos), nxt)
                self.done |= nxt[:, 0] == self.eos
            self.out.scatter_(1, self.counter.expand(rows, 1).clamp(max=capacity - 1), nxt)
            self.counter += 1
            self.tokens.copy_(nxt)
            for static, new in zip(_leaves(self.state), _leaves(new_state)):
                static.copy_(new)

        self.graph = None
        if not use_graphs:
            self.run = body
            return
        # warm-up on a side stream (allocator, library handles, Triton's first compiles), then the
        # capture; both run on the zero buffers, which `load` overwrites before the first replay
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                body()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            body()
        self.run = self.graph.replay

    def load(self, tokens: torch.Tensor, state, temperature: float | None):
        """The batch's first token and its state into the buffers (padding rows zero), counters reset."""
        B = tokens.shape[0]
        self.tokens.zero_()
        self.tokens[:B].copy_(tokens)
        for static, x in zip(_leaves(self.state), _leaves(state)):
            static[B:].zero_()
            static[:B].copy_(x)
        self.counter.zero_()
        self.done.zero_()
        if self.eos is not None:
            self.done[:B] = tokens[:, 0] == self.eos
        self.temperature.fill_(1.0 if temperature is None else temperature)


class GraphedDecoder:
    """Decode loops of one model from CUDA graphs (module docstring).

    step(tokens [B, 1] int64, state) -> (logits [B, vocab], new_state): one decode step of the model,
    reading `state` and returning a new one of the same structure (it must not modify `state`; it
    runs under the caller's no_grad). buckets: the batch sizes graphs are made for (a batch is padded
    to the smallest that holds it). use_graphs: None = on CUDA, off elsewhere. check_every: tokens
    between the host's checks of the end-of-sequence mask (one sync each)."""

    def __init__(self, step, *, buckets=(1, 2, 4, 8, 16, 32, 64, 128), use_graphs: bool | None = None,
                 check_every: int = 32, warmup: int = 2):
        if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive batch sizes, got {buckets!r}")
        self.step, self.buckets = step, tuple(sorted(set(buckets)))
        self.use_graphs, self.check_every, self.warmup = use_graphs, int(check_every), int(warmup)
        self._replays: dict = {}
        self._pool = None
        self.captures = 0       # graphs captured so far (one per bucket, mode, eos and state structure)

    def decode(self, first_tokens: torch.Tensor, state, max_new_tokens: int, temperature: float = 0.0,
               eos_token_id: int | None = None) -> torch.Tensor:
        """first_tokens [B, 1] (already chosen, e.g. from the prefill's logits) and the state after the
        prompt -> the next tokens [B, n], n <= max_new_tokens (fewer when every row has emitted
        eos_token_id: a row that emitted it keeps emitting it). temperature 0: greedy."""
        B = first_tokens.shape[0]
        n = int(max_new_tokens)
        if n <= 0 or B == 0:
            return first_tokens.new_zeros(B, 0, dtype=torch.long)
        device = first_tokens.device
        graphs = device.type == "cuda" if self.use_graphs is None else self.use_graphs
        rows = next((b for b in self.buckets if b >= B), B)
        greedy = temperature == 0
        capacity = max(self.check_every, 1)
        key = (rows, greedy, eos_token_id, _signature(state), str(device), graphs)
        replay = self._replays.get(key)
        if replay is None:
            if graphs and self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            replay = self._replays[key] = _Replay(self.step, state, rows, first_tokens, greedy, eos_token_id,
                                                  capacity, graphs, self._pool, self.warmup)
            self.captures += graphs
        replay.load(first_tokens.long(), state, None if greedy else float(temperature))
        finished = None
        if eos_token_id is not None:
            finished = replay.done[:B].clone()
            if bool(finished.all()):
                return first_tokens.new_zeros(B, 0, dtype=torch.long)
        pieces = []
        for start in range(0, n, capacity):
            count = min(capacity, n - start)
            replay.counter.zero_()
            for _ in range(count):
                replay.run()
            block = replay.out[:B, :count].clone()
            if finished is not None:
                # as an eager loop would: stop right after the token that leaves every row finished
                finished_at = finished[:, None] | (block == eos_token_id).cumsum(1).bool()
                every = finished_at.all(0)
                if bool(every.any()):
                    pieces.append(block[:, :int(every.nonzero()[0, 0]) + 1])
                    break
                finished = finished_at[:, -1]
            pieces.append(block)
        return torch.cat(pieces, 1)
