"""One switch for every kernel test: CUDA when a GPU is present, Triton's interpreter on CPU otherwise.

TRITON_INTERPRET must be set before triton is first imported, so this runs at conftest import,
before any test module (or gsa_kernels) imports triton.
"""
import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402


def _truncate_tf32_in_interpreter():
    """The interpreter multiplies a tl.dot's float32 operands exactly (numpy). The GPU, told
    input_precision="tf32", keeps 10 stored mantissa bits of each and drops the rest (truncation, not
    rounding: tests/test_dots.py `test_tf32_dots_truncate` checks this on the GPU and here). Doing the
    same here lets the interpreter's tests see the half-input paths' tf32 error; without it they would
    pass precision cases that fail on the GPU (docs/design.md, "Precision choices"). float32 inputs use "ieee": untouched.
    Written against Triton 3.6's InterpreterBuilder.create_dot (pinned): fails loudly if it moves."""
    import triton.runtime.interpreter as interpreter
    from triton._C.libtriton import ir

    exact_dot = interpreter.InterpreterBuilder.create_dot

    def truncate(handle):
        if handle.data.dtype != np.float32:
            return handle
        bits = handle.data.view(np.uint32) & np.uint32(0xFFFFE000)
        return interpreter.TensorHandle(bits.view(np.float32), handle.dtype)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32:
            a, b = truncate(a), truncate(b)
        return exact_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


def _patch_language_once_per_launch():
    """Speed only: Triton 3.6's interpreter patches triton.language (interpreter._patch_lang: every
    builtin re-wrapped) at each kernel launch, which is needed, and again at every call of a
    @triton.jit helper inside the kernel, which is not: the launch has already patched the same
    modules with the same builder and restores them when it ends. The repeats were a quarter of an
    interpreted chunk test's time. Here a helper's call whose language modules the running launch
    already patched gets an empty patch scope; any other call goes through as before. Where the
    interpreter lacks these internals (another Triton version), nothing is changed."""
    import inspect

    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    original = getattr(interpreter, "_patch_lang", None)
    launch = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or launch is None or scope_type is None:
        return
    launches = []       # per launch in progress: the language modules it patched (None: not yet)

    def langs_of(fn):
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))

    def patch_lang(fn):
        langs = langs_of(fn)
        if launches and launches[-1] is not None and langs <= launches[-1]:
            return scope_type()          # a helper inside a launch that has patched its modules
        scope = original(fn)
        if launches:
            # the launch's own patch, or a helper's of a module the launch had not patched
            # (triton.language.core, for Triton's own helpers): the interpreter never restores a
            # helper's patch, so either is in effect for the rest of the launch
            launches[-1] = langs | (launches[-1] or frozenset())
        return scope

    def run_launch(self, *args, **kwargs):
        launches.append(None)
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = run_launch


if not ON_GPU:
    _truncate_tf32_in_interpreter()
    _patch_language_once_per_launch()

# Kernel tests run their tensors here: "cuda" on a GPU, "cpu" under the interpreter.
DEVICE = "cuda" if ON_GPU else "cpu"

settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "thorough", max_examples=600, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", max_examples=15, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# triage on a GPU call of 10 minutes: report the first failing example as drawn, without shrinking
settings.register_profile(
    "triage", max_examples=15, deadline=None, print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="session")
def compile_pool():
    """`compile_pool(fn, tasks)`: on a GPU, fn(task) for every task in spawned worker processes first,
    all at once, so that a test that then launches many configs one after another (the candidate-config
    tests) finds them compiled in Triton's on-disk cache instead of compiling each in turn (0.5-3 s
    each, minutes a test). fn must be a module-level function (the workers import it) that swallows
    its own errors: the test's own launch meets them again and reports them. Results are not used.
    Without a GPU (the interpreter compiles nothing), or with GSA_TEST_COMPILE_JOBS=0, it does nothing.
    One pool for the session: a worker's start (torch, Triton, a CUDA context) costs seconds."""
    jobs = int(os.environ.get("GSA_TEST_COMPILE_JOBS", max(0, min(14, (os.cpu_count() or 1) - 2))))
    state = {"pool": None, "broken": not ON_GPU or jobs < 2}

    def run(fn, tasks):
        if state["broken"]:
            return
        try:
            if state["pool"] is None:
                import multiprocessing
                import sys
                from concurrent.futures import ProcessPoolExecutor
                # the workers import fn's test module and its imports from the paths pytest set up
                os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
                state["pool"] = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
            list(state["pool"].map(fn, tasks))
        except Exception as e:     # a speed-up only: the test compiles as it launches
            import warnings
            warnings.warn(f"compile_pool: the parallel compile failed ({type(e).__name__}: {e}); the tests "
                          "compile each config as they launch it")
            state["broken"] = True

    yield run
    if state["pool"] is not None:
        state["pool"].shutdown(wait=True, cancel_futures=True)


def pytest_collection_modifyitems(config, items):
    # the `gpu` marker (registered in pyproject.toml) means "needs CUDA": skip those tests without it
    if ON_GPU:
        return
    no_gpu = pytest.mark.skip(reason="needs CUDA (marked gpu); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)
