"""direct_launch.DirectKernel: the first launch of a specialization goes through Triton, the next ones
straight to its compiled launcher with the same arguments, and every change Triton specializes on
(a constexpr, a dtype, a pointer's 16-byte alignment, an integer's class, num_warps) compiles anew.
A fake kernel stands in for Triton (the launcher path only exists on a GPU; the decode tests run it
there), so this checks the cache's key and the arguments handed over."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gsa_kernels import direct_launch


class FakeCompiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "fn", "meta"

    def run(self, *args):
        self.log.append(("direct", args))


class FakeJit:
    """arg_names / params like a JITFunction: x (pointer), n (int), scale (float), BLOCK (constexpr)."""

    def __init__(self):
        self.arg_names = ["x", "n", "scale", "BLOCK"]
        self.params = [SimpleNamespace(is_constexpr=name == "BLOCK") for name in self.arg_names]
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return FakeCompiled(self.log)
        return launch


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(direct_launch, "_direct_ok", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(direct_launch, "_raw_stream", lambda device: 1234)
    fake = FakeJit()
    return fake, direct_launch.DirectKernel(fake)


def test_second_launch_is_direct_with_every_argument_in_order(kernel):
    fake, k = kernel
    x = torch.zeros(64)
    k[(3, 2)](x, 5, 0.5, BLOCK=32, num_warps=4)
    k[(7, 1)](x, 5, 0.5, BLOCK=32, num_warps=4)
    assert [entry[0] for entry in fake.log] == ["triton", "direct"]
    assert fake.log[1][1] == (7, 1, 1, 1234, "fn", "meta", None, None, None, x, 5, 0.5, 32)


@pytest.mark.parametrize("change", ["constexpr", "dtype", "alignment", "int-one", "int-16", "num_warps"])
def test_what_triton_specializes_on_compiles_anew(kernel, change):
    fake, k = kernel
    x = torch.zeros(64)
    args, kwargs = [x, 5, 0.5], dict(BLOCK=32, num_warps=4)
    k[(1,)](*args, **kwargs)
    if change == "constexpr":
        kwargs["BLOCK"] = 64
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    elif change == "alignment":
        args[0] = x[1:]          # 4 bytes past a 16-byte boundary
    elif change == "int-one":
        args[1] = 1
    elif change == "int-16":
        args[1] = 32
    else:
        kwargs["num_warps"] = 8
    k[(1,)](*args, **kwargs)
    assert [entry[0] for entry in fake.log] == ["triton", "triton"]


def test_a_refused_direct_call_falls_back_to_triton_for_good(kernel):
    fake, k = kernel
    x = torch.zeros(64)

    def refuse(*args):
        raise TypeError("launcher signature")
    k[(1,)](x, 5, 0.5, BLOCK=32)
    next(iter(k.compiled.values())).run = refuse
    k[(1,)](x, 5, 0.5, BLOCK=32)
    k[(1,)](x, 5, 0.5, BLOCK=32)
    assert [entry[0] for entry in fake.log] == ["triton", "triton", "triton"]
    assert direct_launch._direct_ok is False


def test_interpreter_and_unknown_arguments_take_the_regular_launch(kernel, monkeypatch):
    fake, k = kernel
    x = torch.zeros(64)
    k[(1,)](x, None, 0.5, BLOCK=32)       # None: only Triton knows what to make of it
    k[(1,)](x, None, 0.5, BLOCK=32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    k[(1,)](x, 5, 0.5, BLOCK=32)
    k[(1,)](x, 5, 0.5, BLOCK=32)
    assert [entry[0] for entry in fake.log] == ["triton"] * 4


def test_a_registered_launch_hook_takes_the_regular_launch(kernel):
    import triton
    fake, k = kernel
    x = torch.zeros(64)
    chain = triton.knobs.runtime.launch_enter_hook
    assert not direct_launch._hooks_set()
    hook = lambda *args: None   # noqa: E731
    chain.add(hook)
    try:
        assert direct_launch._hooks_set()
        k[(1,)](x, 5, 0.5, BLOCK=32)
        k[(1,)](x, 5, 0.5, BLOCK=32)
    finally:
        chain.remove(hook)
    assert [entry[0] for entry in fake.log] == ["triton", "triton"]
