"""Set-ups that Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) cannot run are refused up front
with an error naming the cause (gsa_kernels/checks.py `check_interpreter`):

  * bfloat16 into chunk_gsa: the interpreter multiplies bfloat16 dots' raw bits as integers (TypeError).
    fused_recurrent_gsa and its decode step take no dots and run bfloat16 correctly: not refused.
  * numpy >= 2.4: every launch fails inside Triton (RuntimeError naming numpy<2.4).

The tests set TRITON_INTERPRET=1 themselves: the checks read it at call time and raise before any
launch, so the error tests mean the same on a GPU machine. The numpy version is patched where the
check reads it; the installed numpy (the test extra pins < 2.4) runs the kernels.
"""
from __future__ import annotations

import types

import pytest
import torch

from conftest import DEVICE, ON_GPU
from gsa_kernels import chunk_gsa, checks, fused_recurrent_gsa
from reference import naive_recurrent_gsa
from test_chunk import BOUNDS, make_inputs, rel_err

BF16_WORDS = r"bfloat16 inputs under TRITON_INTERPRET=1: Triton's interpreter computes bfloat16 dots wrongly"
NUMPY_WORDS = r'pip install "numpy<2\.4"'


@pytest.fixture
def interpreter_on(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def numpy_version(monkeypatch, version):
    monkeypatch.setattr(checks, "np", types.SimpleNamespace(__version__=version))


def inputs(dtype, T=4, requires_grad=False):
    q, k, v, s, g, hk0, hv0 = make_inputs(1, T, 2, 16, 16, 16, dtype, "model", seed=T)
    ins = [x.to(DEVICE).requires_grad_(requires_grad) for x in (q, k, v, s, g)]
    return ins, (hk0.to(DEVICE), hv0.to(DEVICE))


def reference(ins, state):
    return naive_recurrent_gsa(*(x.detach().double().cpu() for x in ins), output_final_state=True,
                               initial_state=tuple(x.double().cpu() for x in state))


# ---------------------------------------------------------------------------------------------------
# bfloat16

@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_bf16_chunk_is_refused_in_the_interpreter(interpreter_on, monkeypatch, training):
    numpy_version(monkeypatch, "2.3.5")        # the GPU image's numpy may be newer: that check comes first
    ins, state = inputs(torch.bfloat16, requires_grad=training)
    with pytest.raises(TypeError, match=BF16_WORDS):
        chunk_gsa(*ins, initial_state=state, output_final_state=True)


@pytest.mark.skipif(ON_GPU, reason="the interpreter's bfloat16 dots: meaningful only where the kernels are interpreted")
def test_bf16_chunk_is_wrong_in_the_interpreter_without_the_guard(monkeypatch):
    """Why the guard exists: let bfloat16 through and chunk_gsa's o is off by orders of magnitude. If a
    Triton update fixes the interpreter's bfloat16 dots this fails, and the guard can go."""
    monkeypatch.setattr(checks, "check_interpreter", lambda dtype, *, bf16_dots=True: None)
    ins, state = inputs(torch.bfloat16)
    with torch.no_grad():
        o, _ = chunk_gsa(*ins, initial_state=state, output_final_state=True)
    ro, _ = reference(ins, state)
    err = ((o.double().cpu() - ro).norm() / ro.norm()).item()   # o may be inf: not rel_err
    assert not err < 1.0, f"bfloat16 chunk_gsa error {err:.1e} in the interpreter: fixed in this Triton?"


@pytest.mark.parametrize("T", [1, 4], ids=["decode", "T4"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_bf16_fused_recurrent_is_allowed_and_right(T, training):
    """fused_recurrent_gsa's kernels (and the decode step's) upcast bfloat16 loads to float32 and take
    no tl.dot: correct in the interpreter, so not refused there."""
    ins, state = inputs(torch.bfloat16, T=T, requires_grad=training)
    with torch.set_grad_enabled(training):
        o, (hk, hv) = fused_recurrent_gsa(*ins, initial_state=state, output_final_state=True)
    ro, (rhk, rhv) = reference(ins, state)
    o_bound, bound = BOUNDS[torch.bfloat16]
    assert o.dtype == torch.bfloat16
    assert rel_err(o, ro) <= o_bound and rel_err(hk, rhk) <= bound and rel_err(hv, rhv) <= bound


# ---------------------------------------------------------------------------------------------------
# numpy >= 2.4

CALLS = {
    "chunk": lambda ins, state: chunk_gsa(*ins, initial_state=state),
    "fused_recurrent": lambda ins, state: fused_recurrent_gsa(*ins, initial_state=state),
    "decode": lambda ins, state: fused_recurrent_gsa(*(x[:, :1] for x in ins), initial_state=state),
}


@pytest.mark.parametrize("version", ["2.4.0", "2.4.6", "2.5.0rc1", "3.0.0"])
@pytest.mark.parametrize("op", CALLS)
def test_numpy_2_4_is_refused_in_the_interpreter(interpreter_on, monkeypatch, op, version):
    numpy_version(monkeypatch, version)
    ins, state = inputs(torch.float32)
    with torch.no_grad(), pytest.raises(RuntimeError, match=NUMPY_WORDS) as info:
        CALLS[op](ins, state)
    assert f"numpy {version} under TRITON_INTERPRET=1" in str(info.value)


@pytest.mark.skipif(ON_GPU, reason="runs the kernels in the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("version", ["2.3.5", "2.0.0", "1.26.4", "2.3.0.dev0+git1234"])
@pytest.mark.parametrize("op", CALLS)
def test_older_numpy_and_float32_float16_run(monkeypatch, op, version, dtype):
    numpy_version(monkeypatch, version)
    ins, state = inputs(dtype)
    with torch.no_grad():
        o, _ = CALLS[op](ins, state)
    assert o.dtype == dtype and torch.isfinite(o).all()


def test_guards_only_with_the_interpreter_on(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    numpy_version(monkeypatch, "2.4.0")
    checks.check_interpreter(torch.bfloat16)          # neither numpy nor bfloat16 matters on a GPU
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match=NUMPY_WORDS):
        checks.check_interpreter(torch.float32)


def test_guards_pass_for_float32_float16_and_old_numpy(interpreter_on, monkeypatch):
    numpy_version(monkeypatch, "2.3.5")
    for dtype in (torch.float32, torch.float16):
        checks.check_interpreter(dtype)
    checks.check_interpreter(torch.bfloat16, bf16_dots=False)


def test_numpy_version_comparison_is_cached(interpreter_on, monkeypatch):
    numpy_version(monkeypatch, "2.3.5")
    checks.check_interpreter(torch.float32)
    hits = checks._numpy_version_breaks_interpreter.cache_info().hits
    checks.check_interpreter(torch.float32)
    assert checks._numpy_version_breaks_interpreter.cache_info().hits == hits + 1
