"""Measuring one op: inputs, rotating copies larger than L2, timing, and the correctness gate.

Timing on a GPU is the median of `triton.testing.do_bench` (its own warm-up, L2 flush before every
repetition) of a step that also rotates through copies of the inputs whose total size exceeds twice
the L2 cache, so no repetition finds its inputs cached by the previous one; or, for ops whose eager
call is mostly host time (the decode step), of replays of a CUDA graph calling each copy once
(`Timer.graphed`). The recurrent op's forward-only phase runs as a serving engine runs it: from a
float32 state, returning the new one (`Inputs(..., states=True)`); without one, the decode step would
neither read nor write the state that is nearly all of its bytes. In Triton's interpreter (--dry-run,
CPU tests) "time" is the wall clock of one call: only the pipeline is exercised.

Correctness gate: the float64 chunkwise reference (reference.chunk_gsa_torch, itself tested against
the recurrence) on batch element 0 of the same rounded inputs; batch elements are independent, so
the op's output and gradients on element 0 must match it within the bounds of docs/contract.md,
"Numerical contract": float32 1e-5; half precision o 5e-3, gradients 1e-2 (relative L2); the final
states of a run from a state within o's bound. A candidate that fails, or raises, never wins.
"""
from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from tuning.shapes import Shape

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GRAD_NAMES = ("q", "k", "v", "s", "g")


def bounds(dtype_name: str) -> dict:
    """docs/contract.md, "Numerical contract": relative L2 error against the float64 reference."""
    if dtype_name == "float32":
        return {"o": 1e-5, "grad": 1e-5}
    return {"o": 5e-3, "grad": 1e-2}


def make_inputs(shape: Shape, dtype_name: str, device, seed: int = 0) -> list[torch.Tensor]:
    """q, k, v, s, g leaves requiring grad; g = logsigmoid(randn) / 8 (the model's gate), s = 1 - exp(g)."""
    dt = TORCH_DTYPES[dtype_name]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, T, H, K, V, M = shape.as_list()

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    g = F.logsigmoid(randn(B, T, H, M)) / 8
    s = 1 - g.exp()
    return [x.to(dt).requires_grad_(True) for x in (q, k, v, s, g)]


def l2_bytes(device) -> int:
    if torch.device(device).type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(torch.device(device))
    return int(getattr(props, "L2_cache_size", 50 << 20))


def make_state(shape: Shape, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 memories (hk [B, H, K, M], hv [B, H, M, V]) to start from, as a serving engine's pool holds."""
    gen = torch.Generator(device="cpu").manual_seed(10_000 + seed)
    B, _, H, K, V, M = shape.as_list()
    return torch.randn(B, H, K, M, generator=gen).to(device), torch.randn(B, H, M, V, generator=gen).to(device)


class Inputs:
    """Rotating input sets (more than 2x L2 in total, at most 8) plus the output gradient `do`;
    with `states`, a float32 state per set too (`self.states`, else None)."""

    def __init__(self, shape: Shape, dtype_name: str, device, states: bool = False):
        self.shape, self.dtype_name, self.device = shape, dtype_name, device
        first = make_inputs(shape, dtype_name, device, seed=0)
        first_state = make_state(shape, device) if states else ()
        set_bytes = sum(x.numel() * x.element_size() for x in (*first, *first_state))
        n = 1 if l2_bytes(device) == 0 else min(8, max(2, math.ceil(2 * l2_bytes(device) / set_bytes)))
        self.sets = [first] + [make_inputs(shape, dtype_name, device, seed=i) for i in range(1, n)]
        self.states = [first_state] + [make_state(shape, device, seed=i) for i in range(1, n)] if states else None
        gen = torch.Generator(device="cpu").manual_seed(1234)
        B, T, H, _, V, _ = shape.as_list()
        self.do = torch.randn(B, T, H, V, generator=gen).to(device=device, dtype=TORCH_DTYPES[dtype_name])


class Reference:
    """float64 output and gradients of batch element 0 (see the module docstring); with the inputs'
    states, also the output and final states of the forward from the first set's state
    (`from_state`: (o, hk, hv), else None)."""

    def __init__(self, inputs: Inputs):
        from reference.chunked import chunk_gsa_torch
        xs = [x.detach()[:1].double().requires_grad_(True) for x in inputs.sets[0]]
        o, _ = chunk_gsa_torch(*xs)
        grads = torch.autograd.grad(o, xs, inputs.do[:1].double())
        self.o = o.detach()
        self.grads = [gr.detach() for gr in grads]
        self.bounds = bounds(inputs.dtype_name)
        self.from_state = None
        if inputs.states is not None:
            state = tuple(h[:1].double() for h in inputs.states[0])
            with torch.no_grad():
                o, (hk, hv) = chunk_gsa_torch(*(x.detach() for x in xs), initial_state=state, output_final_state=True)
            self.from_state = (o, hk, hv)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    denom = ref.norm().item()
    err = (x - ref).norm().item()
    return err / denom if denom > 0 else err


def check(ref: Reference, o: torch.Tensor, grads=None, final_state=None) -> str | None:
    """None if o (and grads) of batch element 0 are within bounds, else the reason. With
    `final_state` (hk, hv), o and the states are those of the run from the inputs' state."""
    if final_state is not None:
        for name, x, xref in zip(("o", "final hk", "final hv"), (o, *final_state), ref.from_state):
            e = rel_err(x.detach()[:1], xref)
            if not e <= ref.bounds["o"]:
                return f"{name} error {e:.2e} > {ref.bounds['o']:.0e} (from a state)"
        return None
    e = rel_err(o.detach()[:1], ref.o)
    if not e <= ref.bounds["o"]:          # also catches NaN
        return f"o error {e:.2e} > {ref.bounds['o']:.0e}"
    for name, gr, gref in zip(GRAD_NAMES, grads or [], ref.grads):
        e = rel_err(gr.detach()[:1], gref)
        if not e <= ref.bounds["grad"]:
            return f"d{name} error {e:.2e} > {ref.bounds['grad']:.0e}"
    return None


class Timer:
    """Median milliseconds of a step: do_bench on CUDA, one wall-clock call in the interpreter."""

    def __init__(self, device, warmup_ms: float = 25, rep_ms: float = 100):
        self.cuda = torch.device(device).type == "cuda"
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def __call__(self, step) -> float:
        if self.cuda:
            import triton.testing
            return float(triton.testing.do_bench(step, warmup=self.warmup_ms, rep=self.rep_ms,
                                                 return_mode="median"))
        times = []
        for _ in range(1):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def graphed(self, fns: list) -> float:
        """Median milliseconds of one call of fns, each called once per replay of a CUDA graph that
        holds them all (kernel time without the host's launch path: what a graphed decode loop pays);
        the wall clock of one call each in the interpreter. For ops whose eager calls are mostly host
        time, where do_bench of the eager call would time Python."""
        if not self.cuda:
            return self(rotating(fns))
        import triton.testing

        def all_once():
            for fn in fns:
                fn()
        graph = cuda_graph(all_once)
        ms = float(triton.testing.do_bench(graph.replay, warmup=self.warmup_ms, rep=self.rep_ms,
                                           return_mode="median"))
        del graph
        return ms / len(fns)


def cuda_graph(fn):
    """fn captured in a CUDA graph (after warm-up calls on a side stream, as capture requires: they
    also compile the kernels). The benchmarks use it too."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def rotating(fns: list):
    """A step calling fns[0], fns[1], ... in turn, one per call."""
    state = {"i": 0}

    def step():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()
    return step
