"""gsa_kernels/launchers/direct.py: after a specialization's first launch through the JIT, a call that
specializes the same way goes to that compiled kernel's launcher with the arguments in parameter order;
anything that could specialize differently (a dtype, a pointer's 16-byte alignment, an integer's value,
a constexpr, a launch option, the device) goes through the JIT again. Checked with a stand-in for the
JIT function and its compiled kernel, on tensors that claim to be on a GPU (no GPU needed); on a GPU
the decode tests launch the real kernels through it."""
from __future__ import annotations

import pytest
import torch

from gsa_kernels.launchers import direct


class FakeCompiled:
    def __init__(self, log, tag):
        self.log, self.tag = log, tag
        self.function, self.packed_metadata = f"function-{tag}", f"meta-{tag}"

    def run(self, g0, g1, g2, stream, function, packed, launch_metadata, enter, exit_, *args):
        assert (function, packed, launch_metadata, enter, exit_) == (self.function, self.packed_metadata, None, None, None)
        self.log.append(("direct", self.tag, (g0, g1, g2), stream, args))


class FakeJIT:
    """kernel(x, y, scale, n, BLOCK: constexpr, FLAG: constexpr)"""
    arg_names = ["x", "y", "scale", "n", "BLOCK", "FLAG"]

    def __init__(self):
        self.log, self.compiles = [], 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.compiles += 1
            self.log.append(("jit", grid, args, tuple(sorted(kwargs.items()))))
            return FakeCompiled(self.log, self.compiles)
        return launch


class OnGPU(torch.Tensor):
    """A CPU tensor that says it is on a GPU, with a chosen data pointer."""

    @staticmethod
    def __new__(cls, ptr, dtype=torch.float32):
        t = torch.zeros(4, dtype=dtype).as_subclass(cls)
        t._ptr = ptr
        return t

    @property
    def is_cuda(self):
        return True

    def data_ptr(self):
        return self._ptr


@pytest.fixture
def on_device(monkeypatch):
    state = {"device": 0}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["device"])
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1000 + device, raising=False)
    return state


def test_same_specialization_goes_direct_in_parameter_order(on_device):
    jit = FakeJIT()
    launch = direct.DirectLaunch(jit)
    x, y = OnGPU(4096), OnGPU(8192)
    launch((2, 3), x, y, 0.5, 7, BLOCK=16, FLAG=True, num_warps=4)
    launch((5,), OnGPU(1 << 20), OnGPU(1 << 21), 0.25, 7, BLOCK=16, FLAG=True, num_warps=4)
    assert jit.compiles == 1
    kind, tag, grid, stream, args = jit.log[-1]
    assert (kind, tag, grid, stream) == ("direct", 1, (5, 1, 1), 1000)
    assert args[2:] == (0.25, 7, 16, True) and args[0].data_ptr() == 1 << 20


@pytest.mark.parametrize("change", ["dtype", "misaligned", "int value", "constexpr", "option", "device"])
def test_anything_that_may_specialize_otherwise_goes_through_the_jit(on_device, change):
    jit = FakeJIT()
    launch = direct.DirectLaunch(jit)
    base = dict(args=[OnGPU(4096), OnGPU(8192), 0.5, 7], kw=dict(BLOCK=16, FLAG=True, num_warps=4))
    launch((1,), *base["args"], **base["kw"])
    args, kw = list(base["args"]), dict(base["kw"])
    if change == "dtype":
        args[0] = OnGPU(4096, torch.bfloat16)
    elif change == "misaligned":
        args[1] = OnGPU(8192 + 4)
    elif change == "int value":
        args[3] = 8
    elif change == "constexpr":
        kw["BLOCK"] = 32
    elif change == "option":
        kw["num_warps"] = 8
    else:
        on_device["device"] = 1
    launch((1,), *args, **kw)
    assert jit.compiles == 2 and jit.log[-1][0] == "jit"
    launch((1,), *args, **kw)                 # and that specialization is direct from then on
    assert jit.compiles == 2 and jit.log[-1][:2] == ("direct", 2)


def test_the_jit_keeps_cpu_tensors_hooks_and_defaulted_parameters(on_device, monkeypatch):
    jit = FakeJIT()
    launch = direct.DirectLaunch(jit)
    for _ in range(2):                         # CPU tensors: Triton's interpreter
        launch((1,), torch.zeros(4), torch.zeros(4), 0.5, 7, BLOCK=16, FLAG=True)
    for _ in range(2):                         # FLAG left to its default: the JIT fills it
        launch((1,), OnGPU(4096), OnGPU(8192), 0.5, 7, BLOCK=16)
    assert [e[0] for e in jit.log] == ["jit"] * 4
    launch((1,), OnGPU(4096), OnGPU(8192), 0.5, 7, BLOCK=16, FLAG=True)
    launch((1,), OnGPU(4096), OnGPU(8192), 0.5, 7, BLOCK=16, FLAG=True)
    assert jit.log[-1][0] == "direct"
    chain = direct.knobs.HookChain()
    chain.add(lambda metadata: None)
    monkeypatch.setattr(direct.knobs.runtime, "launch_enter_hook", chain)
    launch((1,), OnGPU(4096), OnGPU(8192), 0.5, 7, BLOCK=16, FLAG=True)
    assert jit.log[-1][0] == "jit"
