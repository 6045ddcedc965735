"""pytest-benchmark entries for chunk_gsa and its peers, the same ops and shapes as bench_chunk.py.

    python -m pytest benchmarks/test_pytest_bench.py --benchmark-only [-k "a and fwd"]

The op entries need a GPU (skipped without CUDA); the config-lookup entry runs anywhere. Outside the
test suite's testpaths: timings are measured here, never asserted. Each op is synchronized inside the timed call so that pytest-benchmark's wall clock sees the
GPU time; bench_chunk.py (CUDA-event medians of do_bench) stays the reference table.
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_chunk import SHAPES, make_inputs, sdpa_inputs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _ops():
    from gsa_kernels import chunk_gsa
    ops = {"gsa_kernels": lambda q, k, v, s, g: chunk_gsa(q, k, v, s, g)[0]}
    try:
        from fla.ops.gsa import chunk_gsa as fla_chunk_gsa
        ops["fla"] = lambda q, k, v, s, g: fla_chunk_gsa(q, k, v, s, g)[0]
    except ImportError:
        pass
    return ops


@needs_cuda
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("provider", ["gsa_kernels", "fla", "sdpa_cudnn"])
def test_chunk_gsa_speed(benchmark, provider, shape, mode):
    B, T, H, D, M = SHAPES[shape]
    if provider == "sdpa_cudnn":
        inputs = sdpa_inputs(B, T, H, D, torch.bfloat16)

        def fn(a, b, c):
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(a, b, c, is_causal=True)
    else:
        ops = _ops()
        if provider not in ops:
            pytest.skip("flash-linear-attention is not installed (extra `bench`)")
        fn, inputs = ops[provider], make_inputs(B, T, H, D, M, torch.bfloat16)
    do = torch.randn_like(fn(*inputs))

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(*inputs)
        else:
            for x in inputs:
                x.grad = None
            fn(*inputs).backward(do)
        torch.cuda.synchronize()

    step()                                   # compile (and, for fla, autotune) outside the timing
    benchmark.extra_info.update(shape=list(SHAPES[shape]), mode=mode, dtype="bf16")
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)


def test_config_lookup_host_cost(benchmark):
    """CPU time of the seven config lookups of one chunk_gsa forward + backward on an untuned shape
    (the default path, taken on every launch). Runs without a GPU. Memoizing default_config and
    keeping it off Triton's constexpr helpers took a plain loop on a CPU from 270 us to 55 us."""
    from gsa_kernels.candidates import CANDIDATES
    from gsa_kernels.configs import launch_config
    sizes = dict(K=200, V=200, M=48, dtype=torch.bfloat16, tokens=8 * 1000 * 4, seqs=32)

    def lookups():
        for kernel in CANDIDATES:
            launch_config(kernel, **sizes)

    benchmark(lookups)
