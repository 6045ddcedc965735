"""fused_recurrent_gsa, the public token-by-token op (decode steps and short sequences).

Four ways through, picked per call:
  * decode step: T == 1, no cu_seqlens, nothing needs a gradient -> the two launches of
    kernels/decode.py (the keys' memory and partial scores by K tiles; the slot softmax, the values'
    memory and o by V tiles), with float32 states.
  * inference on T > 1 (nothing needs a gradient) -> the two forward launches, no autograd.
  * training -> FusedRecurrentGSAFunction (autograd.py): forward 2 launches (scores by slot tiles,
    then softmax and o by V tiles), backward 4 (dp, keys side, values side, gates); see
    launchers/recurrent.py.
  * inside torch.compile: the custom ops of ops.py (the decode step among them).
Saved for the backward: the inputs, the float32 scores [B, T, HQ, M], the initial states and (with
output_final_state) the final states; no per-step states.

Grouped query heads (q [B, T, HQ, K], k, v, s, g and the states with H = HQ / G heads): every
launch (decode step, forward, backward; eager and compiled) walks one state per kv head and lets the
G query heads of a group read it (kernels/decode.py, kernels/recurrent.py): no repeated tensors,
1 / G of the state bytes and walk work, and inplace=True, out= and state pools work as without
grouping.

The caller's initial state is never written unless asked: `inplace=True` writes the new states into
initial_state (for serving loops that keep one state buffer), `out=(hk, hv)` into given buffers;
both are inference-only (the backward needs the initial state). The kernels read the inputs and the
initial state while they write the new states, so an out buffer may share memory with nothing else:
not the other out buffer, not q, k, v, s, g or cu_seqlens, not the other state; out[i] may only be
exactly initial_state[i] (the in-place update). `_check_out_aliasing` rejects the rest.
"""
from __future__ import annotations

import torch

from gsa_kernels import state_pool
from gsa_kernels.abc_gates import abc_gates
from gsa_kernels.autograd import FusedRecurrentGSAFunction
from gsa_kernels.checks import check_inputs
from gsa_kernels.launchers.recurrent import decode_step, recurrent_fwd
from gsa_kernels.ops import fused_recurrent_compiled
from gsa_kernels.torch_common import reverse_time


def _check_state_buffers(out, N, H, K, M, V, device):
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("out must be a pair (hk [N, H, K, M], hv [N, H, M, V]) of float32 tensors")
    for name, x, shape in (("out[0] (hk)", out[0], (N, H, K, M)), ("out[1] (hv)", out[1], (N, H, M, V))):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        desc = f"{name} (shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device})"
        if tuple(x.shape) != shape or x.dtype != torch.float32 or x.device != device or not x.is_contiguous():
            raise ValueError(f"{desc}: expected a contiguous float32 tensor of shape {shape} on {device}")


def _byte_range(x):
    """(first, last) byte addresses, last exclusive, that x can reach: its storage's address plus its
    offset (data_ptr), and its strided extent; None when x is empty. A strided tensor gets its whole
    span, so two views that interleave without sharing an element count as overlapping (conservative:
    an overlap is never missed). Contiguous tensors, the usual case, skip the Python loop over strides."""
    if x.is_contiguous():
        size = x.nbytes
        if size == 0:
            return None
        first = x.data_ptr()
        return first, first + size
    if x.numel() == 0:
        return None
    first = x.data_ptr()
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(x.shape, x.stride()))
    return first, first + span * x.element_size()


def _overlap(a, b) -> bool:
    return a is not None and b is not None and a[0] < b[1] and b[0] < a[1]


def _check_out_aliasing(out, initial_state, inputs, inplace):
    """ValueError when a new-state buffer shares memory with anything the kernels read, or with the
    other buffer. Host metadata only (addresses, sizes, strides): no device sync, microseconds.
    out[i] that is exactly initial_state[i] (same address, dtype and strides) is the in-place update:
    every program reads each tile of the old state before it writes the same tile of the new one.
    `inputs`: (name, tensor or None) pairs, on out's device."""
    if inplace:
        labels = ("initial_state[0] (hk0, updated in place)", "initial_state[1] (hv0, updated in place)")
    else:
        labels = ("out[0] (hk)", "out[1] (hv)")
    ranges = (_byte_range(out[0]), _byte_range(out[1]))
    if _overlap(*ranges):
        raise ValueError(f"{labels[0]} and {labels[1]} share memory: the two new states would overwrite "
                         f"each other; give two separate buffers")
    states = (None, None) if initial_state is None else initial_state
    state_ranges = [None if x is None else _byte_range(x) for x in states]
    for i, buf in enumerate(out):
        for j, name in enumerate(("initial_state[0] (hk0)", "initial_state[1] (hv0)")):
            if not _overlap(ranges[i], state_ranges[j]):
                continue
            x = states[j]
            if j == i and (x.data_ptr(), x.dtype, x.stride()) == (buf.data_ptr(), buf.dtype, buf.stride()):
                continue   # the in-place update
            if j != i:
                raise ValueError(f"{labels[i]} shares memory with {name}, the other state: the new state "
                                 f"would overwrite it before the kernels read it (out=(hk0, hv0), in this "
                                 f"order, is the in-place update)")
            raise ValueError(f"{labels[i]} overlaps {name} without being the very same buffer (same "
                             f"address, dtype and strides: the in-place update): the new state would "
                             f"overwrite parts of the initial state before the kernels read them")
    for name, x in inputs:
        if x is None:
            continue
        r = _byte_range(x)
        for i in (0, 1):
            if _overlap(ranges[i], r):
                raise ValueError(f"{labels[i]} shares memory with {name}: the new state would overwrite "
                                 f"{name} while the kernels read it; give a buffer apart from the inputs")


def fused_recurrent_gsa(q, k, v, s, g=None, scale=None, initial_state=None, output_final_state=False,
                        reverse=False, cu_seqlens=None, *, inplace=False, out=None, state_indices=None,
                        has_initial_state=None, **kwargs):
    """Gated Slot Attention token by token, with chunk_gsa's arguments and results (docs/contract.md,
    "API").

    q [B, T, HQ, K]; k [B, T, H, K]; v [B, T, H, V]; s, g [B, T, H, M] (g in [-inf, 0], as for chunk_gsa; with
    GSA_KERNELS_VALIDATE=1 a g > 0 raises a ValueError; s and g may be float32 with half q, k, v;
    g=None is ABC mode and cu_seqlens_cpu a host copy of cu_seqlens, both as for chunk_gsa).
    Returns o [B, T, HQ, V] in q's dtype and (hk [N, H, K, M], hv [N, H, M, V]) float32 when
    output_final_state, else (None, None). HQ = H without grouping; grouped query heads (HQ a multiple
    of H, FLA's GQA) read the memory of their kv head hq // (HQ / H), the states are per kv head. For
    T == 1 without gradients this is the decode step (two launches by state tiles). The initial state is only read.
    The positions are flash-linear-attention 0.6.0's.

    reverse=True runs the recurrence from each sequence's last token to its first (the initial state
    enters before the last token; the final states are those after the first), with gates and, in
    ABC mode, write weights of forward time, as FLA's: the op on time-reversed inputs, its output
    reversed back (torch_common.reverse_time: one extra copy of the inputs and of o, and their
    gradients).

    Inference only (nothing may require a gradient):
      inplace=True     write the new states into initial_state (float32, contiguous) and return it.
      out=(hk, hv)     write the new states into these float32 buffers and return them (use two
                       pairs alternately for a state that stays at fixed addresses, e.g. CUDA graphs).
      initial_state=(hk_pool, hv_pool), state_indices=idx, has_initial_state=flags, inplace=True
                       a serving engine's state pools [S, H, ...] (per kv head): sequence n reads and writes slot
                       idx[n] (-1: a padding row, zeros in, nothing written), from zeros where
                       flags[n] is False (gsa_kernels/state_pool.py); returns the pools. The decode
                       step reads and writes them in its kernel; no host sync, graph-capturable.
    """
    cu_seqlens_cpu = kwargs.pop("cu_seqlens_cpu", None)
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__} (cu_seqlens is the 10th "
                        f"argument, after reverse, as in flash-linear-attention)")
    if "head_first" in kwargs:
        raise TypeError("head_first is not supported: inputs are batch-first [B, T, H, D]")
    if kwargs:
        raise TypeError(f"fused_recurrent_gsa got unexpected keyword arguments {sorted(kwargs)}")
    pooled = state_indices is not None
    if has_initial_state is not None and not pooled:
        raise ValueError("has_initial_state goes with state_indices (the slots of the state pools)")
    if pooled and not inplace:
        raise ValueError("state_indices writes the new states into the pools (initial_state): pass inplace=True")
    # bf16_dots=False: these kernels upcast bfloat16 loads to float32 and take no tl.dot, so
    # Triton's interpreter runs them correctly in bfloat16 (checks.check_interpreter)
    problem = check_inputs(q, k, v, s, g, scale, None if pooled else initial_state, cu_seqlens, bf16_dots=False,
                           cu_seqlens_cpu=cu_seqlens_cpu)
    if g is None:
        # ABC mode: plain torch ops before any dispatch (eager, autograd and torch.compile alike)
        s, g = abc_gates(s, cu_seqlens, cu_seqlens_cpu)
    B, T, H, K, V, M, N = problem.B, problem.T, problem.H, problem.K, problem.V, problem.M, problem.N
    scale = K ** -0.5 if scale is None else float(scale)
    if pooled:
        return _pooled(q, k, v, s, g, scale, initial_state, reverse, cu_seqlens, cu_seqlens_cpu, state_indices,
                       has_initial_state, problem)
    if reverse and (T > 1 or cu_seqlens is not None):      # one token is its own reverse
        flip = lambda x: reverse_time(x, cu_seqlens)   # noqa: E731
        o, state = fused_recurrent_gsa(flip(q), flip(k), flip(v), flip(s), flip(g), scale, initial_state,
                                       output_final_state, False, cu_seqlens, inplace=inplace, out=out,
                                       cu_seqlens_cpu=cu_seqlens_cpu)
        return flip(o), state

    hk0 = hv0 = None
    if initial_state is not None and (initial_state[0] is not None or initial_state[1] is not None):
        hk0, hv0 = initial_state
        f32 = dict(dtype=torch.float32, device=q.device)
        hk0 = torch.zeros(N, H, K, M, **f32) if hk0 is None else hk0
        hv0 = torch.zeros(N, H, M, V, **f32) if hv0 is None else hv0
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, s, g, hk0, hv0))

    if inplace:
        if out is not None:
            raise ValueError("give either inplace=True or out=, not both")
        if hk0 is None or initial_state[0] is None or initial_state[1] is None:
            raise ValueError("inplace=True needs initial_state=(hk0, hv0): the buffers to update")
        out = (hk0, hv0)
    if out is not None:
        if needs_grad:
            raise ValueError("inplace=True / out= are for inference: an input requires a gradient "
                             "(run under torch.no_grad(), or drop inplace/out)")
        _check_state_buffers(out, N, H, K, M, V, q.device)
        if not torch.compiler.is_compiling():
            # traced tensors have no addresses to compare. The compiled path below computes the new
            # states functionally and then copies them into `out`, so sharing memory with the inputs
            # or the initial state is harmless there; two overlapping out buffers go unchecked
            cu_here = cu_seqlens if cu_seqlens is not None and cu_seqlens.device == q.device else None
            _check_out_aliasing(out, initial_state, (("q", q), ("k", k), ("v", v), ("s", s), ("g", g),
                                                     ("cu_seqlens", cu_here)), inplace)
        output_final_state = True
    cu = None if cu_seqlens is None else cu_seqlens.to(device=q.device, dtype=torch.int32)

    if torch.compiler.is_compiling():
        # inside torch.compile: the custom ops of gsa_kernels/ops.py; `out` / `inplace` become copies
        o, hk_new, hv_new = fused_recurrent_compiled(
            q, k, v, s, g, None if hk0 is None else hk0.float(), None if hv0 is None else hv0.float(),
            cu, scale, bool(output_final_state), decode=(T == 1 and cu is None and not needs_grad))
        if out is not None:
            out[0].copy_(hk_new)
            out[1].copy_(hv_new)
            hk_new, hv_new = out
        return o, (hk_new, hv_new)

    if not needs_grad:
        q, k, v, s, g = (x.contiguous() for x in (q, k, v, s, g))
        if hk0 is not None and not inplace:
            hk0, hv0 = hk0.contiguous(), hv0.contiguous()
        if output_final_state:
            hk_new, hv_new = out if out is not None else (
                torch.empty(N, H, K, M, dtype=torch.float32, device=q.device),
                torch.empty(N, H, M, V, dtype=torch.float32, device=q.device))
        else:
            hk_new = hv_new = None
        if T == 1 and cu is None:
            o = decode_step(q, k, v, s, g, scale, hk0, hv0, hk_new, hv_new)
        else:
            if hk0 is not None and hk0.dtype != torch.float32:
                hk0, hv0 = hk0.float(), hv0.float()
            o, _ = recurrent_fwd(q, k, v, s, g, scale, hk0, hv0, hk_new, hv_new, cu, N)
        return o, (hk_new, hv_new)

    o, hk, hv = FusedRecurrentGSAFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), s.contiguous(), g.contiguous(),
        None if hk0 is None else hk0.float().contiguous(), None if hv0 is None else hv0.float().contiguous(),
        scale, bool(output_final_state), cu, N)
    return o, (hk, hv)


def _pooled(q, k, v, s, g, scale, pools, reverse, cu_seqlens, cu_seqlens_cpu, state_indices, has_initial_state,
            problem):
    """fused_recurrent_gsa on state pools (state_pool.py): the decode step in its kernel, else the op on
    the gathered states with the final states scattered back."""
    B, T, H, K, V, M, N = problem.B, problem.T, problem.H, problem.K, problem.V, problem.M, problem.N
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, s, g)):
        raise ValueError("state pools (state_indices) are for inference: an input requires a gradient "
                         "(run under torch.no_grad())")
    idx, flags = state_pool.check_pool(pools, state_indices, has_initial_state, N, H, K, M, V, q.device)
    if T == 1 and cu_seqlens is None and not torch.compiler.is_compiling():
        q, k, v, s, g = (x.contiguous() for x in (q, k, v, s, g))
        o = decode_step(q, k, v, s, g, scale, pools[0], pools[1], pools[0], pools[1],
                        state_indices=idx, has_initial_state=flags)
        return o, tuple(pools)
    o, new_states = fused_recurrent_gsa(q, k, v, s, g, scale, state_pool.gather(pools, idx, flags), True,
                                        reverse, cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)
    state_pool.scatter(pools, idx, new_states)
    return state_pool.zero_padding_rows(o, idx, cu_seqlens), tuple(pools)
