"""chunk_gsa, the public chunkwise op: input checks, then one of four ways through.

  * inside torch.compile: the custom ops of ops.py (configs looked up when the graph runs);
  * a shape whose tuned entry chose the torch.compile backend: the pure-PyTorch chunked form
    compiled (torch_chunked.py);
  * forward only (no input requires grad) with half inputs: the forward launches with the chunk
    states as scaled float16, no autograd;
  * otherwise ChunkGSAFunction (autograd.py): the forward launches, and the backward through them.
Before choosing, an untuned shape may be tuned on the spot (opt-in: autotune.py).
"""
from __future__ import annotations

import torch

from gsa_kernels import grouped_heads, state_pool, torch_chunked
from gsa_kernels.abc_gates import abc_gates
from gsa_kernels.autograd import ChunkGSAFunction
from gsa_kernels.autotune import maybe_autotune
from gsa_kernels.checks import check_inputs
from gsa_kernels.configs import launch_config
from gsa_kernels.launchers.chunk import COMPACT_STATES, ChunkLayout, chunk_gsa_fwd, stacked_chunk_limit
from gsa_kernels.lookup import backend_for, compile_mode_for
from gsa_kernels.ops import chunk_gsa_compiled
from gsa_kernels.problem_keys import problem_key


def kernel_chunk_size(chunk_size):
    """FLA's chunk_size (a power of two, or None: the tuned one) as one the kernels run: 16, 32 or 64."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0 \
            or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two (run as 16, 32 or 64), got {chunk_size!r}")
    return min(max(chunk_size, 16), 64)


def chunk_gsa(q, k, v, s, g=None, scale=None, initial_state=None, output_final_state=False, checkpoint_level=2,
              cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    """Gated Slot Attention by the chunkwise algorithm (docs/contract.md, "API").

    q [B, T, HQ, K]; k [B, T, H, K]; v [B, T, H, V]; s, g [B, T, H, M], HQ a multiple of H (grouped
    query heads, FLA's GQA: each kv head's memory is read by its HQ / H query heads and walked once,
    not repeated; the chunk size is capped so that the group's stacked backward walk fits, and groups
    too large for any chunk size run as FLA runs them, kv heads repeated); one dtype among float32 / float16 / bfloat16,
    except that s and g may also be float32 with float16 / bfloat16 q, k, v (their gradients come back
    in their own dtypes).
    g is the log forget gate, in [-inf, 0]: -inf resets a slot exactly, and any finite g <= 0 is
    computed as the recurrence does. g > 0 (a decay above 1) is outside GSA's domain and its result
    undefined; GSA_KERNELS_VALIDATE=1 raises a ValueError for it. A NaN or inf in one token's inputs
    makes the outputs from that token on non-finite (a q: that token's alone), as the recurrence does,
    never earlier ones; the gradients of such a call are non-finite, as autograd through the
    recurrence gives them (0 x NaN).
    g=None is ABC mode (FLA 0.6.0): s are slot logits, written with the weights exp(s_t - z_t) and
    forgotten with g_t = z_{t-1} - z_t (float32), z the running logsumexp of s over each sequence, g = 0
    at its first token also with an initial state (gsa_kernels/abc_gates.py); gradients reach s
    through both.
    cu_seqlens_cpu: a host copy of cu_seqlens (FLA's argument), read for its value checks (and in ABC
    mode for the sequence bounds) instead of copying cu_seqlens to the host; a ValueError if its shape
    differs from cu_seqlens's.
    Returns o [B, T, HQ, V] in q's dtype and (hk [N, H, K, M], hv [N, H, M, V]) float32 final states
    when output_final_state, else (None, None).
    checkpoint_level (flash-linear-attention's argument, same default and position): what a training
    call keeps for its backward. 0 keeps the chunk states ([chunks, H, K, M] and [chunks, H, M, V],
    most of a call's memory: Hk float32, Hv float32 or, for half inputs, scaled float16); 2 keeps the
    inputs and the float32 slot scores (and, for a few long sequences, the chunk states at the start
    of every 1024 tokens) and the backward runs the forward state walk again (one more launch). 1
    (FLA: recompute the gate cumsum) is 0 here: the cumsum is never kept. Calls without gradients keep
    nothing at any level.
    `chunk_size` (keyword) overrides the tuned chunk length: any power of two, as FLA accepts; the
    kernels run 16, 32 or 64, so a smaller one runs as 16 and a larger one as 64. Results do not depend
    on the chunk size beyond rounding (equal within the bounds of docs/contract.md).
    `state_indices` / `has_initial_state` (keywords, inference): initial_state is a serving engine's
    state pools (hk_pool [S, H, K, M], hv_pool [S, H, M, V]) and sequence n reads and writes slot
    state_indices[n] (-1: a padding row, zeros in, o = 0, nothing written), from zeros where
    has_initial_state[n] is False; the new states go into the pools, which are returned
    (gsa_kernels/state_pool.py). No host sync.
    """
    chunk_size = kernel_chunk_size(kwargs.pop("chunk_size", None))
    state_indices, has_initial_state = kwargs.pop("state_indices", None), kwargs.pop("has_initial_state", None)
    if state_indices is not None:
        return _pooled(q, k, v, s, g, scale, initial_state, checkpoint_level, cu_seqlens, cu_seqlens_cpu,
                       state_indices, has_initial_state, chunk_size, kwargs)
    if has_initial_state is not None:
        raise ValueError("has_initial_state goes with state_indices (the slots of the state pools)")
    if "head_first" in kwargs:
        raise TypeError("head_first is not supported: inputs are batch-first [B, T, H, D]")
    if kwargs:
        raise TypeError(f"chunk_gsa got unexpected keyword arguments {sorted(kwargs)}")
    problem = check_inputs(q, k, v, s, g, scale, initial_state, cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)
    if isinstance(checkpoint_level, bool) or checkpoint_level not in (0, 1, 2):
        raise ValueError(f"checkpoint_level must be 0, 1 or 2, got {checkpoint_level!r}")
    if g is None:
        # ABC mode: plain torch ops before any dispatch (eager, autograd and torch.compile alike)
        s, g = abc_gates(s, cu_seqlens, cu_seqlens_cpu)
    scale = problem.K ** -0.5 if scale is None else float(scale)
    # grouped query heads: the chunk size is capped where it is chosen (below, and ops._chunk_size)
    # so that the stacked reverse walk fits (launchers/chunk.py); groups too large for any chunk size
    # run as FLA runs them, the kv heads repeated
    limit = stacked_chunk_limit(problem.group, problem.M)
    if not limit:
        G = problem.group
        return grouped_heads.per_kv_head(chunk_gsa(
            q, *(grouped_heads.expand(x, G) for x in (k, v, s, g)), scale,
            grouped_heads.expand_state(initial_state, G), output_final_state, checkpoint_level, cu_seqlens,
            cu_seqlens_cpu, chunk_size=chunk_size), G)
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
        o, hk, hv = chunk_gsa_compiled(*tensors, cu_seqlens, scale, chunk_size or 0, bool(output_final_state),
                                       int(checkpoint_level))
        return o, (hk, hv)

    sizes = _sizes(problem, q.dtype)
    # opt-in (GSA_KERNELS_AUTOTUNE=1) tuning of an untuned shape, then the backend the tuned file chose
    maybe_autotune(B=problem.B, T=problem.T, H=problem.HQ, N=problem.N, K=problem.K, V=problem.V,
                   M=problem.M, dtype=q.dtype, device=q.device)
    key = problem_key(**sizes)
    if backend_for(key) == "torch_compile":
        # the PyTorch form takes one head count: grouped kv heads repeated (grouped_heads.py)
        G = problem.group
        return grouped_heads.per_kv_head(torch_chunked.compiled(compile_mode_for(key))(
            q, *(grouped_heads.expand(x, G) for x in (k, v, s, g)), scale=scale,
            initial_state=grouped_heads.expand_state((hk0, hv0), G), output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, chunk_size=chunk_size or 64), G)
    BT = min(chunk_size or launch_config("chunk", **sizes)["BT"], limit)
    layout = ChunkLayout(problem.B, problem.T, BT, cu_seqlens, q.device)
    if q.dtype != torch.float32 and not (torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k, v, s, g, hk0, hv0))):
        # forward only: nothing is saved for a backward, so the chunk states can be scaled float16
        o, *_, hk, hv = chunk_gsa_fwd(*tensors[:5], scale, tensors[5], tensors[6], bool(output_final_state),
                                      layout, compact=COMPACT_STATES)
        return o, (hk, hv)
    o, hk, hv = ChunkGSAFunction.apply(*tensors, scale, bool(output_final_state), layout, int(checkpoint_level))
    return o, (hk, hv)


def _sizes(problem, dtype):
    """The work sizes a config lookup takes: per query head (the chunk kernels'; the walks', per kv
    head, are 1 / group of it)."""
    return dict(K=problem.K, V=problem.V, M=problem.M, dtype=dtype,
                tokens=problem.B * problem.T * problem.HQ, seqs=problem.N * problem.HQ)


def _pooled(q, k, v, s, g, scale, pools, checkpoint_level, cu_seqlens, cu_seqlens_cpu, state_indices,
            has_initial_state, chunk_size, kwargs):
    """chunk_gsa on state pools: the op on the gathered states, the final states scattered back."""
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, s, g)):
        raise ValueError("state pools (state_indices) are for inference: an input requires a gradient "
                         "(run under torch.no_grad())")
    problem = check_inputs(q, k, v, s, g, scale, None, cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)
    idx, flags = state_pool.check_pool(pools, state_indices, has_initial_state, problem.N, problem.H, problem.K,
                                       problem.M, problem.V, q.device)
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    o, new_states = chunk_gsa(q, k, v, s, g, scale, state_pool.gather(pools, idx, flags), True, checkpoint_level,
                              cu_seqlens, cu_seqlens_cpu, **extra, **kwargs)
    state_pool.scatter(pools, idx, new_states)
    return state_pool.zero_padding_rows(o, idx, cu_seqlens), tuple(pools)
