"""Causality for non-finite values: a NaN or inf in one token's q, k, v, s or g never reaches an
earlier token's output. In the recurrence such a value enters the memories at its token, so the
outputs from that token on are non-finite and every output before it is exactly what it would have
been without it. A right-padded batch whose padding is left as uninitialised memory relies on this.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, ON_GPU
from gsa_kernels import chunk_gsa
from test_chunk import make_inputs

CHUNKS = [16, 32, 64] if ON_GPU else [16, 64]
# half inputs in the interpreter: the forward-only path (scaled float16 states) with the v case
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if ON_GPU else [])
# float32 runs the same forward kernels with and without gradients (only half inputs have a forward-
# only path of their own), so the interpreter, at ~2 s a case, takes the training path alone
GRADS = [True, False] if ON_GPU else [True]
# every non-finite value in every input but g = -inf, which is a reset, in GSA's domain (test_gates.py)
POISONS = [(name, value) for name in ("q", "k", "v", "s", "g") for value in (float("nan"), float("inf"), float("-inf"))
           if not (name == "g" and value == float("-inf"))]


def _outputs(ins, chunk, grad):
    dev = {n: x.to(DEVICE).requires_grad_(grad) for n, x in ins.items()}
    o, (hk, hv) = chunk_gsa(*dev.values(), output_final_state=True, chunk_size=chunk)
    return o.detach().cpu(), hk, hv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grad", GRADS, ids=["training", "forward-only"][:len(GRADS)])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("name,value", POISONS, ids=[f"{n}-{v}" for n, v in POISONS])
def test_non_finite_value_never_reaches_earlier_tokens(name, value, chunk, grad, dtype):
    T, t = 80, 45                       # t inside a chunk at every chunk size, not at its start
    q, k, v, s, g, _, _ = make_inputs(1, T, 2, 16, 16, 16, dtype, "model", seed=7, initial_state=False)
    clean = dict(q=q, k=k, v=v, s=s, g=g)
    o_clean, _, _ = _outputs(clean, chunk, grad)
    poisoned = dict(clean)
    x = clean[name].clone()
    x[0, t, 1, 3] = value               # one element of one token and head
    poisoned[name] = x
    o, hk, hv = _outputs(poisoned, chunk, grad)
    torch.testing.assert_close(o[:, :t], o_clean[:, :t], rtol=0, atol=0)       # untouched, exactly
    assert torch.isfinite(o[:, :, 0]).all(), "the other head must not see it"
    # the token itself and the later ones of that head see it (q: its own token only)
    later = o[0, t:, 1] if name != "q" else o[0, t:t + 1, 1]
    assert not torch.isfinite(later).all(dim=-1).any(), "every later output of that head is non-finite"
    if name != "q":
        assert not torch.isfinite(hk[0, 1]).all() or not torch.isfinite(hv[0, 1]).all()


@pytest.mark.parametrize("name", ["v", "s"])
def test_non_finite_value_never_reaches_earlier_tokens_half_forward_only(name):
    test_non_finite_value_never_reaches_earlier_tokens(name, float("nan"), CHUNKS[-1], False, torch.float16)
