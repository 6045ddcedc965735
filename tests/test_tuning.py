"""Tuned launch configs: the run-time lookup (gsa_kernels/lookup.py, tuned_file.py, autotune.py) and the
sweep (tuning/).

Lookup: a tuned shape launches its file's configs with zero autotune benchmarks; an untuned shape takes
the nearest entry that fits, or the default; stale, foreign-arch and malformed files give one warning
and the fallback; GSA_KERNELS_TUNED_CONFIGS picks the file (GSA_TUNED_CONFIGS, deprecated, too);
opt-in autotuning persists to the user cache, through the autotuner that tuning/autotuner.py registers
on import (an installed package finds it through its entry point instead).
Sweep: --dry-run end to end in the interpreter (stopped by --time-budget, then --resume), the file it
writes loads at run time, and bad arguments (an arch that is not the GPU present) exit non-zero.
Every op result here is compared with the float64 recurrence. Timing is never asserted.
"""
from __future__ import annotations

import copy
import importlib.metadata
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

import pytest
import torch
import torch.nn.functional as F
import triton
import yaml

from conftest import DEVICE, ON_GPU
from gsa_kernels import (autotune, candidates, chunk_gsa, clear_launches, configs, fused_recurrent_gsa,
                         last_launches, launches, lookup, ops, problem_keys, resources, torch_chunked, tuned_file)
from reference import naive_recurrent_gsa
from tuning import search, shapes, yamlio
import tuning.autotuner  # registers the run-time autotuner, as an installed package's entry point does

ROOT = Path(__file__).resolve().parent.parent
KERNELS = [k for k in candidates.CANDIDATES if k != "chunk"]


@pytest.fixture(autouse=True)
def clean_lookup(monkeypatch, tmp_path):
    """Every test starts with no tuned file, an empty user cache and no opt-in, and forgets after."""
    monkeypatch.setenv(tuned_file.ENV_FILE, "none")
    monkeypatch.delenv(tuned_file.ENV_FILE_DEPRECATED, raising=False)
    monkeypatch.setenv(tuned_file.ENV_CACHE_DIR, str(tmp_path / "user-cache"))
    monkeypatch.delenv(autotune.ENV_AUTOTUNE, raising=False)
    configs.reset()
    yield
    configs.reset()


def arch_here():
    return problem_keys.current_arch() or "sm90"


def meta(**changes):
    m = search.run_meta(arch=arch_here(), dry_run=False, device=DEVICE)
    m.update(changes)
    return m


def shape_key(B, T, H, K, V, M, dtype, N=None):
    return {"K": K, "V": V, "M": M, "dtype": dtype, "tokens": problem_keys.bucket(B * T * H),
            "seqs": problem_keys.bucket((N or B) * H)}


def two_valued_param(kernel):
    """A parameter of the kernel with at least two candidate values, preferring one that no
    dimension prunes (num_warps, num_stages) over the tiles."""
    params = [p for p, vals in candidates.CANDIDATES[kernel].items() if len(vals) >= 2]
    free = [p for p in params if p not in ("BK", "BV", "BM", "BC", "BT")]
    return (free or params)[0]


def non_default_configs(K, V, M, BT=32):
    """A config per kernel (the first candidate values) that differs from default_config."""
    out = {"chunk": {"BT": BT}}
    for kernel in KERNELS:
        default = configs.default_config(kernel, K, V, M)
        cfg = {p: vals[0] for p, vals in candidates.CANDIDATES[kernel].items()}
        if cfg == default:
            p = two_valued_param(kernel)
            cfg[p] = candidates.CANDIDATES[kernel][p][1]
        assert cfg != default
        out[kernel] = cfg
    return out


def small_space(varied: dict[str, str]):
    """CANDIDATES cut to each kernel's default values (K = V = M = 16, one sequence-head: SMALL),
    plus the first two values of the parameter named for a kernel in `varied`: a search the
    interpreter finishes in seconds."""
    small = {"chunk": {"BT": [32]}}
    for kernel in KERNELS:
        default = configs.default_config(kernel, 16, 16, 16, seqs=1)
        small[kernel] = {p: [default[p]] for p in candidates.CANDIDATES[kernel]}
        if kernel in varied:
            p = varied[kernel]
            small[kernel][p] = [default[p]] + [x for x in candidates.CANDIDATES[kernel][p] if x != default[p]][:1]
    return small


def forward_kernels():
    """The kernels chunk_gsa's forward launches (by running one), in launch order."""
    clear_launches()
    chunk_gsa(*inputs(*SMALL))
    return [k for k in last_launches() if k != "chunk"]


def launched_configs():
    """{kernel: config} of this thread's last launches."""
    return {kernel: info["config"] for kernel, info in last_launches().items()}


def entry(key, cfgs, backend="triton"):
    return {"key": key, "shape": [1, 1, 1, key["K"], key["V"], key["M"]], "backend": backend,
            "configs": copy.deepcopy(cfgs), "times_ms": {}}


def write(path, doc):
    path.write_text(yaml.safe_dump(doc, sort_keys=False) if not isinstance(doc, str) else doc)
    return path


def use_file(monkeypatch, path):
    monkeypatch.setenv(tuned_file.ENV_FILE, str(path))
    configs.reset()


def inputs(B, T, H, K, V, M, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, M, generator=gen)) / 8
    s = 1 - g.exp()
    return [x.to(dtype).to(DEVICE).requires_grad_() for x in (q, k, v, s, g)]


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def run_and_check(xs, tol=1e-5):
    """chunk_gsa forward + backward against the float64 recurrence, within the float32 bound of
    docs/contract.md, "Numerical contract"."""
    o, _ = chunk_gsa(*xs)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, xs, do)
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    o_ref, _ = naive_recurrent_gsa(*ref_in)
    ref_grads = torch.autograd.grad(o_ref, ref_in, do.double())
    assert rel(o, o_ref) <= tol
    for gr, gref in zip(grads, ref_grads):
        assert rel(gr, gref) <= tol


class Counter:
    """Counts every way a benchmark could run: our search, triton.testing.do_bench, Triton's Autotuner."""

    def __init__(self, monkeypatch):
        self.do_bench = self.autotuner = 0
        import triton.runtime.autotuner as autotuner
        import triton.testing
        real_bench, real_run = triton.testing.do_bench, autotuner.Autotuner.run

        def bench(*a, **k):
            self.do_bench += 1
            return real_bench(*a, **k)

        def run(*a, **k):
            self.autotuner += 1
            return real_run(*a, **k)
        monkeypatch.setattr(triton.testing, "do_bench", bench)
        monkeypatch.setattr(autotuner.Autotuner, "run", run)

    def total(self):
        return self.do_bench + self.autotuner + launches.stats()["autotune_benchmarks"]


SMALL = (1, 32, 1, 16, 16, 16)   # B, T, H, K, V, M: interpreter-sized


# ---------------------------------------------------------------------------------------------
# lookup

def test_tuned_shape_launches_its_configs_with_zero_autotune_benchmarks(monkeypatch, tmp_path):
    cfgs = non_default_configs(16, 16, 16)
    path = write(tmp_path / "t.yaml", {"meta": meta(), "entries": [entry(shape_key(*SMALL, "float32"), cfgs)]})
    use_file(monkeypatch, path)
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")        # opted in: it would tune if the shape were missing
    counter = Counter(monkeypatch)
    clear_launches()          # earlier tests may have launched the recurrent kernels
    run_and_check(inputs(*SMALL))
    assert counter.total() == 0
    assert launches.stats()["autotune_runs"] == 0
    launched = last_launches()
    training = {k: c for k, c in cfgs.items() if k not in candidates.FORWARD_ONLY}
    assert set(launched) == set(training)       # float32: no forward-only kernels
    for kernel, info in launched.items():
        assert info["source"] == "tuned", kernel
        assert info["config"] == cfgs[kernel], kernel
    assert launched_configs() == training


def test_untuned_shape_with_opt_in_autotunes_persists_and_reuses(monkeypatch, tmp_path):
    # a small candidate space keeps the interpreter quick: two values of one parameter, two kernels
    varied = {KERNELS[0]: two_valued_param(KERNELS[0]), KERNELS[-1]: two_valued_param(KERNELS[-1])}
    monkeypatch.setattr(candidates, "CANDIDATES", small_space(varied))
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    configs.reset()
    counter = Counter(monkeypatch)
    run_and_check(inputs(*SMALL))
    assert launches.stats()["autotune_runs"] == 1
    assert launches.stats()["autotune_benchmarks"] >= 5     # the BT stage, 2 + 2 candidates, the final op
    cache = tuned_file.user_cache_path()
    assert cache.is_file()
    doc = yaml.safe_load(cache.read_text())
    assert [e["key"] for e in doc["entries"]] == [shape_key(*SMALL, "float32")]
    assert {info["source"] for info in last_launches().values()} == {"user-cache"}
    # a later process (reset: nothing in memory) reuses the cache and tunes nothing
    configs.reset()
    counter.do_bench = counter.autotuner = 0
    clear_launches()
    run_and_check(inputs(*SMALL, seed=1))
    assert counter.total() == 0
    assert {info["source"] for info in last_launches().values()} == {"user-cache"}
    assert launched_configs() == {k: c for k, c in doc["entries"][0]["configs"].items()
                                  if k not in candidates.FORWARD_ONLY}   # float32: none launched


@pytest.mark.parametrize("raw, cap, warns", [(None, 8, False), ("3", 3, False), ("0", None, False),
                                              ("-1", 8, True), ("all", 8, True)])
def test_run_time_autotuner_searches_a_bounded_number_of_candidates(monkeypatch, raw, cap, warns):
    """GSA_KERNELS_AUTOTUNE_CANDIDATES caps the run-time search per kernel (default 8, 0: all); a
    value that is not a whole number >= 0 warns once and takes the default."""
    if raw is None:
        monkeypatch.delenv(tuning.autotuner.ENV_CANDIDATES, raising=False)
    else:
        monkeypatch.setenv(tuning.autotuner.ENV_CANDIDATES, raw)
    seen = []
    monkeypatch.setattr(tuning.search, "tune_shape", lambda **kw: seen.append(kw["settings"]) or {"entry": None})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuning.autotuner.tune(B=1, T=32, H=1, K=16, V=16, M=16, dtype=torch.float32, device="cpu")
    ours = [w for w in caught if tuning.autotuner.ENV_CANDIDATES in str(w.message)]
    assert len(ours) == (1 if warns else 0), [str(w.message) for w in caught]
    (settings,) = seen
    assert settings.max_candidates == cap and not settings.compile_backend


def test_capped_search_keeps_the_start_config_and_spreads_the_rest():
    """The cap keeps the start config (so a run-time search never ends slower than untuned) and
    evenly spaced others, in enumeration order."""
    cfgs = [{"x": i} for i in range(10)]
    picked = tuning.search.cap(cfgs, {"x": 7}, 4)
    assert len(picked) == 4 and {"x": 7} in picked and picked == sorted(picked, key=lambda c: c["x"])
    assert {"x": 0} in picked and {"x": 9} in picked
    assert tuning.search.cap(cfgs, {"x": 7}, None) == cfgs


def test_without_opt_in_an_untuned_shape_never_autotunes(monkeypatch):
    counter = Counter(monkeypatch)
    run_and_check(inputs(*SMALL))
    assert counter.total() == 0 and launches.stats()["autotune_runs"] == 0
    assert not tuned_file.user_cache_path().exists()
    assert {info["source"] for info in last_launches().values()} == {"default"}


def test_nearest_entry_is_used_for_an_untuned_shape(monkeypatch, tmp_path):
    near = non_default_configs(16, 16, 16)
    far = {k: {p: vals[-1] for p, vals in candidates.CANDIDATES[k].items()} for k in candidates.CANDIDATES}
    far["chunk"] = {"BT": 64}
    entries = [entry(shape_key(1, 2048, 4, 256, 256, 128, "float16"), far),    # far: K, V, M, dtype
               entry(shape_key(1, 32, 1, 32, 32, 16, "float32"), near)]        # near: K, V one step off
    use_file(monkeypatch, write(tmp_path / "t.yaml", {"meta": meta(), "entries": entries}))
    counter = Counter(monkeypatch)
    run_and_check(inputs(*SMALL))                                              # K = V = 16
    assert counter.total() == 0
    for kernel, info in last_launches().items():
        assert info["source"] == "nearest"
        assert info["config"] == near[kernel]
        assert info["entry"] == problem_keys.problem_key(**shape_key(1, 32, 1, 32, 32, 16, "float32"))


def test_nearest_distance_rule():
    key = problem_keys.problem_key(K=128, V=128, M=64, dtype=torch.bfloat16, tokens=65536, seqs=32)
    # one doubling of M (weight 2) is farther than one of K (weight 1)
    assert lookup.distance(key, (128, 128, 128, "bfloat16", 65536, 32)) == 2
    assert lookup.distance(key, (256, 128, 64, "bfloat16", 65536, 32)) == 1
    # float16 is near bfloat16, float32 is far from both; work-size buckets weigh half
    assert lookup.distance(key, (128, 128, 64, "float16", 65536, 32)) == 1
    assert lookup.distance(key, (128, 128, 64, "float32", 65536, 32)) == 4
    assert lookup.distance(key, (128, 128, 64, "bfloat16", 4 * 65536, 8)) == 2
    assert problem_keys.bucket(65536 + 1000) == 65536 and problem_keys.bucket(3 * 65536) == 4 * 65536


def test_nearest_entry_that_does_not_fit_is_skipped(monkeypatch, tmp_path):
    # tuned at M = 16 with BT = 64 and wide tiles: fine there, over the register estimate at M = 256
    big = {k: {p: vals[-1] for p, vals in candidates.CANDIDATES[k].items()} for k in candidates.CANDIDATES}
    big["chunk"] = {"BT": 64}
    for k in KERNELS:
        if "num_warps" in big[k]:
            big[k]["num_warps"] = min(candidates.CANDIDATES[k]["num_warps"])
    probe = KERNELS[0]
    key = shape_key(1, 32, 1, 16, 16, 16, "float32")
    assert lookup.entry_fits(tuned_file.parse_entry(entry(key, big), 0), problem_keys.problem_key(**key))
    use_file(monkeypatch, write(tmp_path / "t.yaml", {"meta": meta(), "entries": [entry(key, big)]}))
    cfg = configs.launch_config(probe, K=16, V=16, M=256, dtype=torch.float32, tokens=32, seqs=1)
    assert last_launches()[probe]["source"] == "default"
    assert cfg == configs.default_config(probe, 16, 16, 256, seqs=1)
    # the same file serves a problem where the entry fits (same dims, another work size)
    configs.launch_config(probe, K=16, V=16, M=16, dtype=torch.float32, tokens=64, seqs=1)
    assert last_launches()[probe]["source"] == "nearest"


def test_default_configs_always_fit_and_survive_pruning():
    grid = shapes.parse_shapes("bench,common-full") + [shapes.Shape(1, 700, 2, 64, 64, 256)]
    for shape in grid:
        for dtype in ("bfloat16", "float16", "float32"):
            for kernel in KERNELS:
                BT = configs.default_config("chunk", shape.K, shape.V, shape.M)["BT"]
                # as the sweep starts from them: at the shape's chunk size and sequence-heads
                d = configs.default_config(kernel, shape.K, shape.V, shape.M, BT, seqs=shape.B * shape.H)
                assert resources.fits(d, K=shape.K, V=shape.V, M=shape.M, BT=BT, dtype=dtype, arch="sm90"), \
                    (shape, dtype, kernel, d)
                kept, _ = search.prune(kernel, search.enumerate_space(kernel), shape=shape, dtype=dtype,
                                       BT=BT, arch="sm90")
                assert d in kept, (shape, dtype, kernel, d)


def test_pruning_rules():
    shape = shapes.Shape(1, 32, 1, 16, 48, 16)      # pow2: K 16, V 64, M 16, T 32
    for kernel in KERNELS:
        cands = candidates.CANDIDATES[kernel]
        kept, pruned = search.prune(kernel, search.enumerate_space(kernel), shape=shape,
                                    dtype="float16", BT=32, arch="sm90")
        assert kept and len(kept) + len(pruned) == len(search.enumerate_space(kernel))
        if "BK" in cands:          # K pads to 16: only the smallest BK
            assert {c["BK"] for c in kept} == {min(cands["BK"])}
        if "BV" in cands:          # V pads to 64: every BV up to 64
            assert {c["BV"] for c in kept} == {x for x in cands["BV"] if x <= 64}
        if "BC" in cands:          # never a sub-chunk longer than the chunk
            assert all(c["BC"] <= 32 for c in kept)
    bts, _ = search.prune("chunk", search.enumerate_space("chunk"), shape=shape, dtype="float16", BT=None,
                          arch="sm90")
    assert [c["BT"] for c in bts] == [32]


def test_tie_break_is_deterministic():
    a, b, c = {"x": 1}, {"x": 2}, {"x": 3}
    order = [a, b, c]
    # b fastest, a within 2%: the earlier (a) wins; the runner-up is the fastest of the rest
    assert search.tie_break([(c, 1.00), (b, 0.99), (a, 1.005)], order, None, 0.02) == (a, 1.005, 0.99)
    # the start (default) config wins any near-tie it is part of
    assert search.tie_break([(a, 1.01), (b, 1.00), (c, 1.015)], order, c, 0.02)[0] == c
    # outside the window the fastest wins
    assert search.tie_break([(a, 1.10), (b, 1.00)], order, a, 0.02) == (b, 1.00, 1.10)


def test_known_miscompile_is_never_launched(monkeypatch, tmp_path):
    """configs.miscompiled (8 warps at chunk 64 for the forward chunk kernels, Triton 3.6 on the H100):
    the defaults avoid it, the sweep prunes it, and a tuned config that has it (tuned at chunk 32,
    called with chunk_size=64) launches with 4 warps and its other parameters."""
    shape = shapes.Shape(8, 2048, 4, 512, 512, 64)
    for kernel in ("chunk_fwd", "chunk_fwd_compact"):
        d = configs.default_config(kernel, 512, 512, 64, 64, seqs=32)
        assert d["num_warps"] == 4 and not configs.miscompiled(kernel, d, 64), d
        for BT, pruned in ((64, True), (32, False)):
            kept, why = search.prune(kernel, search.enumerate_space(kernel), shape=shape, dtype="bfloat16",
                                     BT=BT, arch="sm90")
            assert any(c["num_warps"] == 8 for c in kept) != pruned, (kernel, BT)
            assert any("miscompile" in w for w in why) == pruned, (kernel, BT)
    assert configs.default_config("chunk_bwd_keys", 512, 512, 64, 64, seqs=32)["num_warps"] == 8  # not in the list
    cfgs = non_default_configs(16, 16, 16)
    cfgs["chunk_fwd"] = {"BK": 32, "BV": 64, "num_warps": 8, "num_stages": 2}
    key = shape_key(*SMALL, "float32")
    use_file(monkeypatch, write(tmp_path / "w8.yaml", {"meta": meta(), "entries": [entry(key, cfgs)]}))
    at = dict(K=16, V=16, M=16, dtype=torch.float32, tokens=32, seqs=1)
    assert configs.launch_config("chunk_fwd", BT=32, **at) == cfgs["chunk_fwd"]
    assert configs.launch_config("chunk_fwd", BT=64, **at) == dict(cfgs["chunk_fwd"], num_warps=4)
    assert last_launches()["chunk_fwd"]["config"]["num_warps"] == 4


def test_env_override_and_missing_files(monkeypatch, tmp_path):
    cfgs = non_default_configs(16, 16, 16)
    key = shape_key(*SMALL, "float32")
    use_file(monkeypatch, write(tmp_path / "mine.yaml", {"meta": meta(), "entries": [entry(key, cfgs)]}))
    kernel = KERNELS[0]
    assert configs.launch_config(kernel, K=16, V=16, M=16, dtype=torch.float32, tokens=32, seqs=1) \
        == cfgs[kernel]
    # "none" switches the file off: defaults, silently
    use_file(monkeypatch, "none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert configs.launch_config(kernel, K=16, V=16, M=16, dtype=torch.float32, tokens=32, seqs=1) \
            == configs.default_config(kernel, 16, 16, 16, seqs=1)
    # a path that does not exist: the user asked for it, so one warning
    use_file(monkeypatch, tmp_path / "nope.yaml")
    with pytest.warns(RuntimeWarning, match="does not exist"):
        configs.launch_config(kernel, K=16, V=16, M=16, dtype=torch.float32, tokens=32, seqs=1)


def test_deprecated_variable_name_is_read_with_one_warning(monkeypatch, tmp_path):
    """GSA_TUNED_CONFIGS, the variable's name before the GSA_KERNELS_ prefix, still picks the file, with
    one FutureWarning per process naming the new name; when both are set the new one wins."""
    cfgs = non_default_configs(16, 16, 16)
    path = write(tmp_path / "old.yaml", {"meta": meta(), "entries": [entry(shape_key(*SMALL, "float32"), cfgs)]})
    kernel = KERNELS[0]
    at = dict(K=16, V=16, M=16, dtype=torch.float32, tokens=32, seqs=1)
    monkeypatch.delenv(tuned_file.ENV_FILE)
    monkeypatch.setenv(tuned_file.ENV_FILE_DEPRECATED, str(path))
    configs.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in KERNELS:
            configs.launch_config(k, **at)
        lookup.reload()                      # the files are read again: no second warning
        assert configs.launch_config(kernel, **at) == cfgs[kernel]
    ours = [w for w in caught if "gsa_kernels" in str(w.message)]
    assert len(ours) == 1 and ours[0].category is FutureWarning, [str(w.message) for w in caught]
    assert "GSA_TUNED_CONFIGS is deprecated: set GSA_KERNELS_TUNED_CONFIGS" in str(ours[0].message)
    assert last_launches()[kernel]["source"] == "tuned"
    assert tuned_file.tuned_file_path() == path
    # both set: the new name wins (no file here), and the warning says the old one is ignored
    monkeypatch.setenv(tuned_file.ENV_FILE, "none")
    configs.reset()
    with pytest.warns(FutureWarning, match="ignored, as GSA_KERNELS_TUNED_CONFIGS is set"):
        assert configs.launch_config(kernel, **at) == configs.default_config(kernel, 16, 16, 16, seqs=1)
    assert last_launches()[kernel]["source"] == "default"


def test_no_shipped_file_for_the_arch_is_silent(monkeypatch, tmp_path):
    monkeypatch.delenv(tuned_file.ENV_FILE)
    monkeypatch.setattr(tuned_file, "current_arch", lambda: "sm90")
    monkeypatch.setattr(tuned_file, "tuned_configs_dir", lambda: tmp_path)      # no sm90.yaml there
    configs.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = configs.launch_config(KERNELS[-1], K=64, V=64, M=64, dtype=torch.bfloat16, tokens=4096, seqs=4)
    assert cfg == configs.default_config(KERNELS[-1], 64, 64, 64)
    assert launches.stats()["files_read"] == 0


def _on_fake_gpu(monkeypatch, tmp_path, model):
    """Shipped files from tmp_path, read as on a GPU of arch sm90 and this model; no user cache."""
    monkeypatch.delenv(tuned_file.ENV_FILE, raising=False)
    monkeypatch.delenv(tuned_file.ENV_FILE_DEPRECATED, raising=False)
    monkeypatch.setenv(tuned_file.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.setattr(tuned_file, "current_arch", lambda: "sm90")
    monkeypatch.setattr(tuned_file, "current_device_model", lambda: model)
    monkeypatch.setattr(tuned_file, "tuned_configs_dir", lambda: tmp_path)
    configs.reset()


def _source_and_config(kernel, K, V, M):
    cfg = configs.launch_config(kernel, K=K, V=V, M=M, dtype=torch.float32, tokens=32, seqs=1)
    return last_launches()[kernel]["source"], cfg


def test_device_file_first_then_the_arch_file_then_nearest_of_the_device(monkeypatch, tmp_path):
    """On a (fake) NVIDIA H200 with sm90-nvidia-h200.yaml and sm90.yaml: a key both files hold comes from
    the device file; a key only the arch file holds from it; a key neither holds from the device
    file's nearest entry, before any nearer entry of the arch file."""
    _on_fake_gpu(monkeypatch, tmp_path, "nvidia-h200")
    on_device = non_default_configs(16, 16, 16)
    kernel = KERNELS[-1]
    p = two_valued_param(kernel)
    other = {k: dict(c) for k, c in on_device.items()}
    other[kernel][p] = next(v for v in candidates.CANDIDATES[kernel][p] if v != on_device[kernel][p])
    both, arch_only = shape_key(*SMALL, "float32"), shape_key(1, 32, 1, 32, 32, 16, "float32")
    write(tmp_path / "sm90-nvidia-h200.yaml", {"meta": meta(arch="sm90", gpu="NVIDIA H200"),
                                               "entries": [entry(both, on_device)]})
    write(tmp_path / "sm90.yaml", {"meta": meta(arch="sm90", gpu="NVIDIA H100 80GB HBM3"),
                                   "entries": [entry(both, other), entry(arch_only, other),
                                               entry(shape_key(1, 32, 1, 64, 64, 16, "float32"), other)]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _source_and_config(kernel, 16, 16, 16) == ("device", on_device[kernel])
        assert _source_and_config(kernel, 32, 32, 16) == ("tuned", other[kernel])
        # K = V = 64 is nearer the arch file's third entry (exact dims), but the device file wins
        assert _source_and_config(kernel, 64, 64, 32) == ("nearest-device", on_device[kernel])


def test_device_file_of_another_model_warns_and_is_not_used(monkeypatch, tmp_path):
    _on_fake_gpu(monkeypatch, tmp_path, "nvidia-h200")
    key = shape_key(*SMALL, "float32")
    write(tmp_path / "sm90-nvidia-h200.yaml", {"meta": meta(arch="sm90", gpu="NVIDIA H100 80GB HBM3"),
                                               "entries": [entry(key, non_default_configs(16, 16, 16))]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source, cfg = _source_and_config(KERNELS[-1], 16, 16, 16)
    ours = [str(w.message) for w in caught if "gsa_kernels" in str(w.message)]
    assert len(ours) == 1 and "but this GPU is nvidia-h200" in ours[0], ours
    assert source == "default"


def test_device_slug():
    assert problem_keys.device_slug("NVIDIA H200") == "nvidia-h200"
    assert problem_keys.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tuned_file.device_file_name("sm90", "nvidia-h200") == "sm90-nvidia-h200.yaml"


def test_file_is_read_once(monkeypatch, tmp_path):
    key = shape_key(*SMALL, "float32")
    use_file(monkeypatch, write(tmp_path / "t.yaml", {"meta": meta(),
                                                      "entries": [entry(key, non_default_configs(16, 16, 16))]}))
    for M in (16, 32, 64):
        for kernel in candidates.CANDIDATES:
            configs.launch_config(kernel, K=16, V=16, M=M, dtype=torch.float32, tokens=32, seqs=1)
    assert launches.stats()["files_read"] == 1


# ---------------------------------------------------------------------------------------------
# files that must not be used: one warning, then the fallback

def _launch_all_twice():
    out = []
    for _ in range(2):
        for kernel in candidates.CANDIDATES:
            out.append(configs.launch_config(kernel, K=16, V=16, M=16, dtype=torch.float32, tokens=32, seqs=1))
    return out


def _expect_one_warning_and_defaults(match):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _launch_all_twice()
    ours = [w for w in caught if "gsa_kernels" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert ours[0].category is RuntimeWarning
    assert match in str(ours[0].message), str(ours[0].message)
    assert {info["source"] for info in last_launches().values()} == {"default"}
    for kernel, info in last_launches().items():
        assert info["config"] == configs.default_config(kernel, 16, 16, 16, seqs=1)


@pytest.mark.parametrize("change,match", [
    ({"kernel_hashes": {k: "0123456789abcdef" for k in candidates.CANDIDATES}}, "other sources or candidate lists of every kernel"),
    ({"candidates": {k: "x" for k in candidates.CANDIDATES}}, "other sources or candidate lists of every kernel"),
    ({"format": 1}, "meta.format must be 2"),
], ids=["every-kernel-source", "every-candidate-list", "old-format"])
def test_stale_file_warns_once_and_falls_back(monkeypatch, tmp_path, change, match):
    key = shape_key(*SMALL, "float32")
    doc = {"meta": meta(**change), "entries": [entry(key, non_default_configs(16, 16, 16))]}
    use_file(monkeypatch, write(tmp_path / "stale.yaml", doc))
    _expect_one_warning_and_defaults(match)


def test_file_from_another_triton_version_keeps_its_configs(monkeypatch, tmp_path):
    """A file made with another Triton version (a user on a newer PyTorch stack): one warning naming
    both versions, its configs used, each launch naming the file's version; a known miscompile of
    this version (8 warps in chunk_fwd at chunk 64) is still fenced at launch."""
    key = shape_key(*SMALL, "float32")
    tuned_configs = non_default_configs(16, 16, 16)
    tuned_configs["chunk_fwd"] = dict(tuned_configs["chunk_fwd"], num_warps=8)
    use_file(monkeypatch, write(tmp_path / "other.yaml", {"meta": meta(triton="0.0.1"),
                                                          "entries": [entry(key, tuned_configs)]}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _launch_all_twice()
        fenced = configs.launch_config("chunk_fwd", K=16, V=16, M=16, dtype=torch.float32, BT=64,
                                       tokens=32, seqs=1)
    ours = [str(w.message) for w in caught if "gsa_kernels" in str(w.message)]
    assert len(ours) == 1 and f"made with Triton 0.0.1 (this is {triton.__version__})" in ours[0], ours
    for kernel, info in last_launches().items():
        assert (info["source"], info["file_triton"]) == ("tuned", "0.0.1"), kernel
        if kernel != "chunk_fwd":
            assert info["config"] == tuned_configs[kernel], kernel
    assert fenced == dict(tuned_configs["chunk_fwd"], num_warps=4)


@pytest.mark.parametrize("what", ["kernel_hashes", "candidates"])
def test_stale_kernel_falls_back_alone(monkeypatch, tmp_path, what):
    """A file measured on another source (or candidate list) of chunk_fwd only: chunk_fwd launches
    with its default after one warning naming it; every other kernel keeps its tuned config."""
    key = shape_key(*SMALL, "float32")
    m = meta()
    m[what] = dict(m[what], chunk_fwd="0123456789abcdef")
    tuned_configs = non_default_configs(16, 16, 16)
    use_file(monkeypatch, write(tmp_path / "part.yaml", {"meta": m, "entries": [entry(key, tuned_configs)]}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _launch_all_twice()
    ours = [str(w.message) for w in caught if "gsa_kernels" in str(w.message)]
    assert len(ours) == 1 and "stale for kernels ['chunk_fwd']" in ours[0], ours
    for kernel, info in last_launches().items():
        if kernel == "chunk_fwd":
            assert info["source"] == "default"
            assert info["config"] == configs.default_config(kernel, 16, 16, 16, seqs=1)
        else:
            assert (info["source"], info["config"]) == ("tuned", tuned_configs[kernel]), kernel


def test_stale_kernel_with_another_candidate_list_falls_back_alone(monkeypatch, tmp_path):
    """A kernel whose candidate list gained a parameter since the sweep: its old configs lack it.
    That kernel is stale (one warning), not the whole file malformed: the others keep their configs."""
    key = shape_key(*SMALL, "float32")
    m = meta()
    m["candidates"] = dict(m["candidates"], states_fwd="0123456789abcdef")
    tuned_configs = non_default_configs(16, 16, 16)
    old_states_fwd = {p: v for p, v in tuned_configs["states_fwd"].items() if p != "SEGMENT"}
    doc = {"meta": m, "entries": [entry(key, dict(tuned_configs, states_fwd=old_states_fwd))]}
    use_file(monkeypatch, write(tmp_path / "old-list.yaml", doc))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _launch_all_twice()
    ours = [str(w.message) for w in caught if "gsa_kernels" in str(w.message)]
    assert len(ours) == 1 and "stale for kernels ['states_fwd']" in ours[0], ours
    for kernel, info in last_launches().items():
        if kernel == "states_fwd":
            assert info["source"] == "default"
        else:
            assert (info["source"], info["config"]) == ("tuned", tuned_configs[kernel]), kernel


def _edited_kernel_hashes(tmp_path, file, old, new):
    """kernel_hashes of a copy of gsa_kernels/kernels/ with one edit (old -> new) in `file`."""
    from gsa_kernels import kernel_hashes
    copy = tmp_path / "kernels"
    shutil.copytree(kernel_hashes.KERNELS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    text = (copy / file).read_text()
    assert text.count(old) == 1, f"{old!r} must occur once in {file}"
    (copy / file).write_text(text.replace(old, new))
    return kernel_hashes.hashes_of(copy)


def test_kernel_hashes_follow_each_kernels_own_source(tmp_path):
    """Per-kernel staleness: an edit to the decode kernel changes its hash alone (every chunk and
    token-by-token kernel keeps its own); a code edit to an intra-chunk helper changes exactly the
    kernels that call it (the state walks do not); a comment or docstring edit changes nothing."""
    from gsa_kernels.kernel_hashes import kernel_hashes
    now = kernel_hashes()
    assert set(now) == set(candidates.all_candidates())

    decode = _edited_kernel_hashes(tmp_path / "a", "decode.py", "z = tl.where((mm < M)[None, :], z * scale",
                                   "z = tl.where((mm < M)[None, :], z * scale * 1.0")
    assert {k for k in now if decode[k] != now[k]} == {"decode"}

    intra = _edited_kernel_hashes(tmp_path / "b", "intra.py", "X, 0.0), axis=1)", "X, -0.0), axis=1)")
    changed = {k for k in now if intra[k] != now[k]}
    assert changed == {"chunk", "chunk_fwd", "chunk_fwd_compact", "chunk_bwd_dscores", "chunk_bwd_keys",
                       "chunk_bwd_values"}

    walk = _edited_kernel_hashes(tmp_path / "c", "states.py", "decay = tl.exp(Gend)\n        if DO_KEYS:\n            hk",
                                 "decay = tl.exp(Gend + 0.0)\n        if DO_KEYS:\n            hk")
    assert {k for k in now if walk[k] != now[k]} == {"chunk", "states_fwd", "states_fwd_compact"}

    comment = _edited_kernel_hashes(tmp_path / "d", "states.py", "# hk, hv hold the states at the start",
                                    "# hk and hv hold the states at the start")
    assert comment == now
    docstring = _edited_kernel_hashes(tmp_path / "e", "intra.py", '"""X[i, i] as a [BT] vector."""',
                                      '"""The diagonal X[i, i], a [BT] vector."""')
    assert docstring == now


def test_foreign_arch_file_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(tuned_file, "current_arch", lambda: "sm90")
    key = shape_key(*SMALL, "float32")
    doc = {"meta": meta(arch="sm80"), "entries": [entry(key, non_default_configs(16, 16, 16))]}
    use_file(monkeypatch, write(tmp_path / "sm80.yaml", doc))
    _expect_one_warning_and_defaults("tuned for sm80, but this GPU is sm90")


def test_dry_run_file_is_refused_on_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(tuned_file, "current_arch", lambda: "sm90")
    key = shape_key(*SMALL, "float32")
    doc = {"meta": meta(arch="sm90", dry_run=True), "entries": [entry(key, non_default_configs(16, 16, 16))]}
    use_file(monkeypatch, write(tmp_path / "dry.yaml", doc))
    _expect_one_warning_and_defaults("--dry-run")


def _bad_value_entry():
    cfgs = non_default_configs(16, 16, 16)
    cfgs[KERNELS[0]][two_valued_param(KERNELS[0])] = 48          # not a candidate
    return [entry(shape_key(*SMALL, "float32"), cfgs)]


def _missing_kernel_entry():
    cfgs = non_default_configs(16, 16, 16)
    del cfgs[KERNELS[-1]]
    return [entry(shape_key(*SMALL, "float32"), cfgs)]


@pytest.mark.parametrize("content,match", [
    ("meta: [unclosed\n  - : :", "not readable YAML"),
    ("- just\n- a list\n", "top level is not a mapping"),
    ("!!python/object/apply:os.system ['echo should-never-run']\n", "not readable YAML"),
    ("BAD_VALUE", "is not a candidate"),
    ("MISSING_KERNEL", "must name exactly the kernels"),
    ("NO_ENTRIES", "no `entries` list"),
    ("BAD_KEY", "key.K must be a positive int"),
], ids=["syntax", "not-a-mapping", "unsafe-tag", "bad-value", "missing-kernel", "no-entries", "bad-key"])
def test_malformed_file_warns_once_and_falls_back(monkeypatch, tmp_path, content, match):
    if content == "BAD_VALUE":
        content = {"meta": meta(), "entries": _bad_value_entry()}
    elif content == "MISSING_KERNEL":
        content = {"meta": meta(), "entries": _missing_kernel_entry()}
    elif content == "NO_ENTRIES":
        content = {"meta": meta()}
    elif content == "BAD_KEY":
        e = entry(shape_key(*SMALL, "float32"), non_default_configs(16, 16, 16))
        e["key"]["K"] = "sixteen"
        content = {"meta": meta(), "entries": [e]}
    use_file(monkeypatch, write(tmp_path / "bad.yaml", content))
    _expect_one_warning_and_defaults(match)


def _schema_breaks():
    """(id, document) pairs that parse as YAML but break the schema where a careless reader would
    raise: unhashable values where hashable ones belong, ints beyond float range, deep nesting."""
    def doc_with(edit):
        d = {"meta": meta(), "entries": [entry(shape_key(*SMALL, "float32"), non_default_configs(16, 16, 16))]}
        edit(d)
        return d
    kernel = KERNELS[0]
    param = two_valued_param(kernel)
    cases = [
        ("dtype-list", doc_with(lambda d: d["entries"][0]["key"].update(dtype=["float32"]))),
        ("dtype-dict", doc_with(lambda d: d["entries"][0]["key"].update(dtype={"a": 1}))),
        ("key-huge-int", doc_with(lambda d: d["entries"][0]["key"].update(K=10 ** 400))),
        ("key-list", doc_with(lambda d: d["entries"][0]["key"].update(M=[16]))),
        ("param-list", doc_with(lambda d: d["entries"][0]["configs"][kernel].update({param: [1]}))),
        ("candidate-hash-list", doc_with(lambda d: d["meta"]["candidates"].update({kernel: ["x"]}))),
        ("kernel-hash-dict", doc_with(lambda d: d["meta"]["kernel_hashes"].update({kernel: {"x": 1}}))),
        ("backend-list", doc_with(lambda d: d["entries"][0].update(backend=["triton"]))),
        ("format-list", doc_with(lambda d: d["meta"].update(format=[2]))),
        ("arch-list", doc_with(lambda d: d["meta"].update(arch=["sm90"]))),
        ("entries-scalar", doc_with(lambda d: d.update(entries=7))),
    ]
    return cases


SCHEMA_BREAKS = _schema_breaks()


@pytest.mark.parametrize("content", [c for _, c in SCHEMA_BREAKS], ids=[i for i, _ in SCHEMA_BREAKS])
@pytest.mark.parametrize("where", ["tuned-file", "user-cache"])
def test_schema_break_anywhere_warns_once_and_falls_back(monkeypatch, tmp_path, content, where):
    """A file that parses but breaks the schema, as the tuned file or as the user cache (read even
    with GSA_KERNELS_TUNED_CONFIGS=none): one RuntimeWarning, the defaults, never an exception."""
    if where == "tuned-file":
        use_file(monkeypatch, write(tmp_path / "bad.yaml", content))
    else:
        tuned_file.user_cache_path().parent.mkdir(parents=True, exist_ok=True)
        write(tuned_file.user_cache_path(), content)
        configs.reset()
    _expect_one_warning_and_defaults("malformed")
    run_and_check(inputs(*SMALL))          # and chunk_gsa itself runs


def test_deeply_nested_or_oversized_file_warns_once_and_falls_back(monkeypatch, tmp_path):
    use_file(monkeypatch, write(tmp_path / "deep.yaml", "[" * 20000 + "]" * 20000))
    _expect_one_warning_and_defaults("malformed")
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (tuned_file.MAX_FILE_BYTES // 10 + 1))
    use_file(monkeypatch, big)
    _expect_one_warning_and_defaults("byte limit")
    assert launches.stats()["files_read"] == 0          # refused by its size, never parsed


@pytest.mark.parametrize("broken", ["file-as-folder", "read-only-folder", "cache-file-is-a-folder"])
def test_unusable_user_cache_location_keeps_the_autotuned_config(monkeypatch, tmp_path, broken):
    """GSA_KERNELS_AUTOTUNE=1 with a cache location that cannot be written: one warning, the tuned
    config used for the rest of the process, no exception, no second tune."""
    tuned_entry = entry(shape_key(*SMALL, "float32"), non_default_configs(16, 16, 16))
    calls = []

    def fake_tune(**kw):
        calls.append(kw)
        return {"entry": copy.deepcopy(tuned_entry)}
    monkeypatch.setattr(search, "tune_shape", fake_tune)
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    if broken == "file-as-folder":
        (tmp_path / "blocker").write_text("a file where the cache folder should be")
        monkeypatch.setenv(tuned_file.ENV_CACHE_DIR, str(tmp_path / "blocker" / "cache"))
    elif broken == "read-only-folder":
        monkeypatch.setattr(yamlio, "atomic_write_yaml", _raise(PermissionError(13, "Permission denied")))
    else:
        tuned_file.user_cache_path().mkdir(parents=True)
    configs.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            run_and_check(inputs(*SMALL, seed=seed))
    ours = [str(w.message) for w in caught if "gsa_kernels" in str(w.message)]
    assert len(ours) == 1 and "could not save an autotuned entry" in ours[0], ours
    assert len(calls) == 1
    launched = last_launches()
    assert {info["source"] for info in launched.values()} == {"autotuned"}
    for kernel, info in launched.items():
        assert info["config"] == tuned_entry["configs"][kernel], kernel


@pytest.mark.parametrize("path", ["autograd-function", "custom-op"])
def test_backward_on_another_thread_keeps_the_forward_threads_override(path):
    """PyTorch runs a CUDA backward on its own worker thread: the backward kernels must still launch
    with the override of the thread that ran the forward, and be recorded there. Emulated on any
    device by running the backward from a second thread; the same for eager calls (the autograd
    Function) and for the custom op called eagerly (both share autograd.chunk_gsa_backward)."""
    import threading
    forced = non_default_configs(16, 16, 16)
    bwd_kernels = ("states_bwd", "chunk_bwd_dscores", "chunk_bwd_keys", "chunk_bwd_values")
    ins = [x.to(DEVICE).requires_grad_() for x in inputs(*SMALL)]
    clear_launches()
    with launches.override({k: forced[k] for k in bwd_kernels}):
        if path == "custom-op":
            o = ops.chunk_gsa_fwd_op(*ins, None, None, None, 0.25, 32, False, 2)[0]
        else:
            o, _ = chunk_gsa(*ins, chunk_size=32)
    worker = threading.Thread(target=lambda: o.sum().backward())
    worker.start()
    worker.join(120)
    launched = last_launches()
    for kernel in bwd_kernels:
        assert launched[kernel]["source"] == "override", kernel
        assert launched[kernel]["config"] == forced[kernel], kernel
    assert all(x.grad is not None for x in ins)


def test_recurrent_backward_on_another_thread_is_recorded_in_the_forward_thread():
    """The token-by-token op's backward carries the forward thread's launch scope too."""
    import threading
    ins = [x.to(DEVICE).requires_grad_() for x in inputs(1, 3, 1, 16, 16, 16)]
    clear_launches()
    o, _ = fused_recurrent_gsa(*ins)
    worker = threading.Thread(target=lambda: o.sum().backward())
    worker.start()
    worker.join(120)
    assert {"recurrent_bwd_dp", "recurrent_bwd_gates"} <= set(last_launches())
    assert all(x.grad is not None for x in ins)


def _raise(error):
    def fail(*a, **k):
        raise error
    return fail


def test_overrides_and_launch_records_are_per_thread(monkeypatch, tmp_path):
    """An override active in one thread never steers another thread's launches, and survives
    nothing after its block; last_launches() answers for the calling thread."""
    import threading
    kernel = KERNELS[0]
    forced = non_default_configs(16, 16, 16)[kernel]
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def tuner():
        with launches.override({kernel: forced}):
            configs.launch_config(kernel, K=16, V=16, M=16, dtype=torch.float32, tokens=32, seqs=1)
            seen["tuner"] = last_launches()[kernel]
            inside.set()
            release.wait(10)
        seen["tuner_after"] = launches.current_override()

    t = threading.Thread(target=tuner)
    t.start()
    assert inside.wait(10)
    try:
        cfg = configs.launch_config(kernel, K=16, V=16, M=16, dtype=torch.float32, tokens=32, seqs=1)
        assert cfg == configs.default_config(kernel, 16, 16, 16, seqs=1)
        assert launches.current_override() is None
        assert last_launches()[kernel]["source"] == "default"
    finally:
        release.set()
        t.join(10)
    assert seen["tuner"]["source"] == "override" and seen["tuner"]["config"] == forced
    assert seen["tuner_after"] is None
    assert last_launches()[kernel]["source"] == "default"      # this thread's record, not the tuner's
    other = {}
    reader = threading.Thread(target=lambda: other.update(last_launches()))
    reader.start()
    reader.join(10)
    assert other == {}                                          # a fresh thread has launched nothing


# ---------------------------------------------------------------------------------------------
# the torch.compile backend

def test_compiled_forms_are_compiled_up_front_in_parallel_and_failures_not_again(monkeypatch):
    """The sweep compiles every shape's torch.compile form first, `jobs` subprocesses at a time: a
    failure or a --compile-timeout kill is recorded and its shape not compiled again (its entry says
    why); a kill for lack of --time-budget, or a shape never started before the deadline, is no verdict
    (the timed run compiles it)."""
    import threading
    import time as time_mod
    from tuning import compile_backend
    work = [(shapes.Shape(1, 32 * (i + 1), 1, 16, 16, 16), "float16") for i in range(6)]
    running, peak, calls, lock = [0], [0], [], threading.Lock()

    def fake_run(shape, dtype, settings, *, warm, timeout=None):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            calls.append((shape.T, warm, timeout))
        time_mod.sleep(0.05)
        with lock:
            running[0] -= 1
        return {64: {"error": "failed (exit 1): boom"},
                96: {"error": "not timed: compiling took over 300 s (--compile-timeout)", "cut": False},
                128: {"error": "not timed: compiling took over 300 s (--compile-timeout)", "cut": True}
                }.get(shape.T, {"warm": True})
    monkeypatch.setattr(compile_backend, "_run", fake_run)
    st = search.Settings()
    failed = compile_backend.warm_in_subprocesses(work, st, jobs=2)
    assert peak[0] == 2 and sorted(t for t, _, _ in calls) == [32, 64, 96, 128, 160, 192]
    assert all(warm for _, warm, _ in calls)
    assert failed == {((1, 64, 1, 16, 16, 16), "float16"): "failed (exit 1): boom",
                      ((1, 96, 1, 16, 16, 16), "float16"): "not timed: compiling took over 300 s (--compile-timeout)"}
    st.compile_failed = failed
    timed = compile_backend.measure_in_subprocess(work[1][0], "float16", st)
    assert "boom" in timed["error"] and "up-front" in timed["error"] and len(calls) == 6   # not run again
    compile_backend.measure_in_subprocess(work[3][0], "float16", st)                     # the cut one: run
    assert calls[-1] == (128, False, None)
    calls.clear()
    assert compile_backend.warm_in_subprocesses(work, st, jobs=2, deadline=time_mod.monotonic() - 1) == {}
    assert calls == []                                                                    # past the deadline
    # the sweep's phase: half the kernels' workers, its deadline, the failures kept for the entries
    from tuning import sweep as sweep_cli
    seen = []
    monkeypatch.setattr(compile_backend, "warm_in_subprocesses",
                        lambda w, s, jobs, deadline: seen.append((len(w), jobs, deadline)) or {"x": "y"})
    st = search.Settings(jobs=6)
    sweep_cli._compile_forms_up_front(st, [(shape, dtype, None) for shape, dtype in work], 123.0)
    assert seen == [(6, 3, 123.0)] and st.compile_failed == {"x": "y"}


def test_compiled_form_warm_run_compiles_and_runs_without_checking_or_timing(monkeypatch, capsys):
    """`python -m tuning.compile_backend` with "warm": the forward and backward run once (what
    compiles them into the caches) and nothing is checked or timed."""
    from gsa_kernels import torch_chunked
    from tuning import compile_backend, measure
    ran = []

    def form(*xs):
        ran.append(len(xs))
        return torch_chunked.chunk_gsa_torch(*xs)
    monkeypatch.setattr(torch_chunked, "compiled", lambda mode: form)
    monkeypatch.setattr(measure, "Reference", lambda *a: pytest.fail("a warm run checks nothing"))
    monkeypatch.setattr(measure, "Timer", lambda *a: pytest.fail("a warm run times nothing"))
    compile_backend.main(['{"shape": [1, 32, 1, 16, 16, 16], "dtype": "float32", "mode": "default", '
                          '"warmup_ms": 1, "rep_ms": 1, "warm": true}'])
    assert ran == [5] and capsys.readouterr().out.strip() == '{"warm": true}'


def test_torch_compile_backend_is_dispatched_for_an_exact_entry(monkeypatch, tmp_path):
    """An exact entry with backend torch_compile runs the compiled PyTorch form in the mode it was
    timed with (an entry naming none: torch_chunked.COMPILE_MODE, the older sweeps' mode)."""
    from reference import chunk_gsa_torch
    calls = []

    def fake_compiled(mode):         # stands in for torch.compile(chunk_gsa_torch, mode): eager
        def run(*a, **k):
            calls.append((mode, k.get("chunk_size")))
            return chunk_gsa_torch(*a, **k)
        return run
    monkeypatch.setattr(torch_chunked, "_compiled", {m: fake_compiled(m) for m in tuned_file.COMPILE_MODES})
    key = shape_key(*SMALL, "float32")
    tc = dict(entry(key, non_default_configs(16, 16, 16), backend="torch_compile"), compile_mode="default")
    doc = {"meta": meta(), "entries": [tc]}
    use_file(monkeypatch, write(tmp_path / "tc.yaml", doc))
    run_and_check(inputs(*SMALL))
    assert calls == [("default", 64)]
    assert last_launches() == {}                       # no Triton kernel launched
    # another shape (nearest only) stays on the Triton kernels
    run_and_check(inputs(1, 32, 1, 16, 16, 32))
    assert len(calls) == 1 and {i["source"] for i in last_launches().values()} == {"nearest"}
    # an entry from before entries named their mode: the mode the sweep then always used
    del tc["compile_mode"]
    use_file(monkeypatch, write(tmp_path / "tc-unnamed.yaml", doc))
    run_and_check(inputs(*SMALL))
    assert calls[-1] == (torch_chunked.COMPILE_MODE, 64)
    # a file from another torch version: its backend choice is not trusted, the kernels run
    doc["meta"]["torch"] = "1.0.0"
    use_file(monkeypatch, write(tmp_path / "tc-old.yaml", doc))
    run_and_check(inputs(*SMALL))
    assert len(calls) == 2 and {i["source"] for i in last_launches().values()} == {"tuned"}


# ---------------------------------------------------------------------------------------------
# the sweep

def sweep(*args, env=None, timeout=600):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("TRITON_INTERPRET", None)       # the CLI must set it itself for --dry-run
    return subprocess.run([sys.executable, "-m", "tuning.sweep", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# The dry run executes the kernels in Triton's interpreter, even on a GPU machine; Triton 3.6's
# interpreter calls int() on one-element arrays, which numpy >= 2.4 rejects (pyproject pins the test
# extra below 2.4, so CI runs this; the GPU image ships a newer numpy).
NUMPY_TOO_NEW_FOR_INTERPRETER = tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4)


@pytest.mark.skipif(NUMPY_TOO_NEW_FOR_INTERPRETER,
                    reason=f"numpy {np.__version__}: Triton 3.6's interpreter needs numpy < 2.4")
def test_sweep_dry_run_end_to_end_with_budget_resume_and_runtime_load(monkeypatch, tmp_path):
    out = tmp_path / "sm90.yaml"
    # one candidate a kernel: the budget, resume and load paths are this test's, the search others'
    first = sweep("--arch", "sm90", "--dry-run", "--max-candidates", "1", "--output", str(out), "--time-budget", "1")
    assert first.returncode == 0, first.stderr
    assert "stopped by --time-budget" in first.stderr and "ETA" in first.stderr
    doc1 = yaml.safe_load(out.read_text())
    assert doc1["meta"]["dry_run"] is True and doc1["meta"]["complete"] is False
    assert len(doc1["entries"]) == 1
    second = sweep("--arch", "sm90", "--dry-run", "--max-candidates", "1", "--output", str(out), "--resume")
    assert second.returncode == 0, second.stderr
    doc2 = yaml.safe_load(out.read_text())
    assert doc2["meta"]["complete"] is True and len(doc2["entries"]) == 2
    assert doc1["entries"][0] in doc2["entries"]           # kept as it was, not tuned again
    tiny = shapes.PRESETS["tiny"]()
    assert sorted(e["shape"] for e in doc2["entries"]) == sorted(s.as_list() for s in tiny)
    for e in doc2["entries"]:
        assert e["times_ms"]["triton_fwd_bwd"] > 0 and e["backend"] == "triton"
        assert set(e["configs"]) == set(candidates.CANDIDATES)
        assert any("torch_compile" in n for n in e["notes"])
    assert not list(tmp_path.glob(".*.tmp"))               # atomic writes leave no temp files
    # the runtime loads it: the tuned shape launches its entry's configs with zero benchmarks
    use_file(monkeypatch, out)
    counter = Counter(monkeypatch)
    shape = tiny[0]
    xs = inputs(shape.B, shape.T, shape.H, shape.K, shape.V, shape.M, torch.float16)
    if ON_GPU:   # a dry-run file is refused on a GPU (its times are the interpreter's)
        with pytest.warns(RuntimeWarning, match="dry-run"):
            chunk_gsa(*xs)
        return
    o, _ = chunk_gsa(*xs)
    o_ref, _ = naive_recurrent_gsa(*[x.detach().double() for x in xs])
    assert rel(o, o_ref) <= 5e-3
    assert counter.total() == 0
    want = next(e for e in doc2["entries"] if e["shape"] == shape.as_list())
    launched = last_launches()
    assert "chunk" in launched and len(launched) >= 2
    for kernel, info in launched.items():
        assert info["source"] == "tuned" and info["config"] == want["configs"][kernel]


def test_sweep_refuses_an_arch_that_is_not_present(monkeypatch, capsys):
    from tuning import sweep as sweep_cli
    if not ON_GPU:
        monkeypatch.setattr(problem_keys, "current_arch", lambda: "sm80")
    present = problem_keys.current_arch()
    other = "sm100" if present != "sm100" else "sm90"
    assert sweep_cli.main(["--arch", other]) == 2
    err = capsys.readouterr().err
    assert f"--arch {other} but the GPU present is {present}" in err


@pytest.mark.skipif(ON_GPU, reason="needs a machine without CUDA")
def test_sweep_without_a_gpu_exits_non_zero():
    res = sweep("--arch", "sm90", timeout=120)
    assert res.returncode == 2
    assert "no CUDA GPU is present" in res.stderr


@pytest.mark.parametrize("args,match", [
    (["--arch", "hopper", "--dry-run"], "--arch must look like sm90"),
    (["--arch", "sm90", "--dry-run", "--shapes", "nosuch"], "--shapes 'nosuch'"),
    (["--arch", "sm90", "--dry-run", "--dtypes", "int8"], "--dtypes 'int8'"),
    (["--arch", "sm90", "--dry-run", "--kernels", "nosuch"], "--kernels: unknown"),
    (["--arch", "sm90", "--dry-run", "--output", "tuned_configs/sm90.yaml"], "never overwrites"),
    (["--arch", "sm90", "--dry-run", "--output", "tuned_configs/sm90-nvidia-h200.yaml"], "never overwrites"),
], ids=["arch", "shapes", "dtypes", "kernels", "shipped-output", "shipped-device-output"])
def test_sweep_bad_arguments_exit_2_naming_the_argument(args, match):
    res = sweep(*args, timeout=120)
    assert res.returncode == 2 and match in res.stderr, res.stderr


def test_sweep_resume_refuses_a_file_from_other_software(tmp_path):
    out = tmp_path / "old.yaml"
    m = search.run_meta(arch="sm90", dry_run=True, device="cpu")
    m["triton"] = "0.0.1"
    out.write_text(yamlio.dump({"meta": m, "entries": [], "failed": []}))
    res = sweep("--arch", "sm90", "--dry-run", "--output", str(out), "--resume", timeout=120)
    assert res.returncode == 2 and "made with other hardware or software" in res.stderr
    assert yaml.safe_load(out.read_text())["meta"]["triton"] == "0.0.1"     # left untouched


def test_correctness_gate_rejects_a_wrong_candidate(monkeypatch):
    """A candidate whose output is wrong (a forward kernel's non-default value, corrupted on purpose)
    is rejected by the float64 reference check and cannot win, however fast."""
    kernel = forward_kernels()[0]
    param = two_valued_param(kernel)
    small = small_space({kernel: param})
    good, bad = small[kernel][param]
    monkeypatch.setattr(candidates, "CANDIDATES", small)
    real = search.chunk_gsa

    def faulty(*a, **k):
        o, states = real(*a, **k)
        if launches.current_override() and launches.current_override()[kernel][param] == bad:
            o = o * 1.01                                # 1% off: over the 1e-5 bound
        return o, states
    monkeypatch.setattr(search, "chunk_gsa", faulty)
    st = search.Settings(kernels=(kernel,), compile_backend=False)
    res = search.tune_shape(B=1, T=32, H=1, K=16, V=16, M=16, dtype=torch.float32, device=DEVICE, settings=st)
    e = res["entry"]
    assert e["configs"][kernel][param] == good
    assert len(e["rejected"][kernel]) == 1 and "o error" in e["rejected"][kernel][0]
    assert e["candidates"][kernel] == {"timed": 1, "pruned": 0, "rejected": 1}


def test_seeded_search_retunes_only_the_named_kernels(monkeypatch):
    """sweep --seed: after a change to some kernels, only theirs are re-tuned; every other kernel
    keeps the seed file's config and the chunk size stays the seed's (a seed at chunk 16, which the
    defaults never pick)."""
    kernel = forward_kernels()[0]
    param = two_valued_param(kernel)
    kept = "chunk_bwd_values"                 # not tuned: must keep the seed's non-default value
    kept_param = two_valued_param(kept)
    small = small_space({kernel: param, kept: kept_param})
    small["chunk"] = {"BT": [16, 32]}
    monkeypatch.setattr(candidates, "CANDIDATES", small)
    seed_cfgs = {name: {p: vals[0] for p, vals in space.items()} for name, space in small.items()}
    seed_cfgs["chunk"] = {"BT": 16}
    default = configs.default_config(kept, 16, 16, 16, 16, seqs=1)[kept_param]
    seed_cfgs[kept][kept_param] = next(v for v in small[kept][kept_param] if v != default)
    others = [k for k in small if k not in (kernel, "chunk")]
    key = problem_keys.problem_key(K=16, V=16, M=16, dtype="float32", tokens=32, seqs=1)
    st = search.Settings(kernels=(kernel,), compile_backend=False, seed={("chunk", key): seed_cfgs}, seeded_from="abc")
    res = search.tune_shape(B=1, T=32, H=1, K=16, V=16, M=16, dtype=torch.float32, device=DEVICE, settings=st)
    e = res["entry"]
    assert e["configs"]["chunk"] == {"BT": 16}
    for name in others:
        assert e["configs"][name] == seed_cfgs[name], name
    assert e["candidates"][kernel]["timed"] == 2          # the named kernel was searched
    assert st.as_meta()["seeded_from"] == "abc"
    # without a seed the same search starts from the defaults (chunk 32 for this shape)
    plain = search.tune_shape(B=1, T=32, H=1, K=16, V=16, M=16, dtype=torch.float32, device=DEVICE,
                              settings=search.Settings(kernels=(kernel,), compile_backend=False))
    assert plain["entry"]["configs"]["chunk"] == {"BT": 32}
    assert plain["entry"]["configs"][kept][kept_param] == default


def test_compile_plan_covers_the_search_and_fills_new_parameters_from_the_defaults():
    """The sweep compiles each shape's plan up front (tuning/precompile.py): every chunk size at the
    start configs, and each tuned kernel's candidates at the start chunk size. A seed made before a
    parameter existed (the walks' SEGMENT) starts from its configs with that parameter at its default,
    never from the first candidate of the space (which timed H100 tiles of 64 as tiles of 32)."""
    shape = shapes.Shape(8, 2048, 4, 512, 512, 64)
    key = problem_keys.problem_key(K=512, V=512, M=64, dtype="bfloat16", tokens=8 * 2048 * 4, seqs=32)
    default = search.default_start("states_fwd", shape, 32)
    old = {p: v for p, v in default.items() if p != "SEGMENT"}
    old["BK"] = old["BV"] = next(v for v in candidates.CANDIDATES["states_fwd"]["BK"] if v != default["BK"])
    seed = {("chunk", key): {"chunk": {"BT": 32}, "states_fwd": old}}
    one = search.compile_plan(shape, "bfloat16", search.Settings(max_candidates=1, seed=seed), "sm90")
    assert [label for label, _, _ in one] == [("BT", 32)]
    first = search.prune("states_fwd", search.enumerate_space("states_fwd"), shape=shape, dtype="bfloat16",
                         BT=32, arch="sm90")[0][0]
    assert one[0][1]["states_fwd"] == {**old, "SEGMENT": default["SEGMENT"]} != first
    assert one[0][1]["chunk"] == {"BT": 32} and one[0][2] == "all"
    plan = search.compile_plan(shape, "bfloat16", search.Settings(max_candidates=3), "sm90")
    bts = [label[1] for label, _, _ in plan if label[0] == "BT"]
    assert len(bts) > 1 and len(set(bts)) == len(bts)
    at = {label[0] for label, _, _ in plan if label[0] != "BT"}       # one chunk size: the start's
    assert len(at) == 1
    BT0 = at.pop()
    tuned = {label[1] for label, _, _ in plan if label[0] != "BT"}
    assert tuned == {k for k in candidates.CANDIDATES if k != "chunk" and len(search.kernel_space(
        k, BT0, shape, "bfloat16", search.Settings(max_candidates=3), "sm90", None)[0]) > 1}


def test_sweep_seed_must_match_the_run(tmp_path):
    """A seed file from a GPU sweep cannot seed a dry run (nor the reverse), nor a file from another arch."""
    seed = tmp_path / "seed.yaml"
    for dry, arch, match in ((False, "sm90", "on a GPU"), (True, "sm80", "made for sm80")):
        m = search.run_meta(arch=arch, dry_run=dry, device="cpu")
        yamlio.atomic_write_yaml(seed, {"meta": m, "entries": []})
        res = sweep("--arch", "sm90", "--dry-run", "--seed", str(seed), "--output", str(tmp_path / "o.yaml"),
                    timeout=120)
        assert res.returncode == 2 and "--seed" in res.stderr and match in res.stderr, res.stderr


def test_atomic_write_leaves_the_old_file_on_failure(monkeypatch, tmp_path):
    path = tmp_path / "t.yaml"
    yamlio.atomic_write_yaml(path, {"meta": {"a": 1}, "entries": []})
    before = path.read_text()

    def crash(fd):
        raise OSError("disk gone")
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        yamlio.atomic_write_yaml(path, {"meta": {"a": 2}, "entries": [1, 2, 3]})
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.yaml"]


def test_user_cache_merge_replaces_a_stale_cache(tmp_path):
    path = tmp_path / "sm90.yaml"
    m = search.run_meta(arch="sm90", dry_run=False, device="cpu")
    e1 = entry(shape_key(*SMALL, "float32"), non_default_configs(16, 16, 16))
    e2 = entry(shape_key(1, 64, 1, 16, 16, 16, "float32"), non_default_configs(16, 16, 16))
    yamlio.merge_entry(path, e1, meta=m)
    yamlio.merge_entry(path, e2, meta=m)
    assert len(yaml.safe_load(path.read_text())["entries"]) == 2
    yamlio.merge_entry(path, e2, meta={**m, "triton": "9.9.9"})     # other software: start over
    doc = yaml.safe_load(path.read_text())
    assert [x["key"] for x in doc["entries"]] == [e2["key"]] and doc["meta"]["triton"] == "9.9.9"
    assert triton.__version__ != "9.9.9"


def test_failed_opt_in_autotuning_warns_once_and_is_not_retried(monkeypatch):
    calls = []

    def failing(**kw):
        calls.append(kw)
        return {"entry": None, "failed": "no candidate passed"}
    monkeypatch.setattr(search, "tune_shape", failing)
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    with pytest.warns(RuntimeWarning, match="autotuning .* failed"):
        run_and_check(inputs(*SMALL))
    run_and_check(inputs(*SMALL, seed=1))
    assert len(calls) == 1 and launches.stats()["autotune_runs"] == 1
    assert {info["source"] for info in last_launches().values()} == {"default"}
    assert not tuned_file.user_cache_path().exists()


def test_opt_in_without_an_autotuner_warns_once_and_uses_the_defaults(monkeypatch):
    """GSA_KERNELS_AUTOTUNE=1 where no autotuner is registered and no entry point offers one: one
    warning, nothing tuned, the defaults."""
    monkeypatch.setattr(autotune, "_autotuner", None)
    monkeypatch.setattr(autotune, "entry_points", lambda group: [])
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_and_check(inputs(*SMALL))
        run_and_check(inputs(*SMALL, seed=1))
    ours = [str(w.message) for w in caught if "gsa_kernels" in str(w.message)]
    assert len(ours) == 1 and "no autotuner is available" in ours[0], ours
    assert launches.stats()["autotune_runs"] == 0
    assert {info["source"] for info in last_launches().values()} == {"default"}


def test_autotuner_is_found_through_its_entry_point(monkeypatch):
    """With nothing registered, the first call that wants to tune loads the entry points of the group
    (what an installed gsa-kernels declares: see the next test) and tunes with what they register."""
    calls = []

    def fake_tune(**kw):
        calls.append(kw)
        return {"entry": entry(shape_key(*SMALL, "float32"), non_default_configs(16, 16, 16))}
    monkeypatch.setattr(search, "tune_shape", fake_tune)
    monkeypatch.setattr(autotune, "_autotuner", None)
    point = importlib.metadata.EntryPoint(name="search", value="tuning.autotuner:register",
                                          group=autotune.ENTRY_POINT_GROUP)
    monkeypatch.setattr(autotune, "entry_points", lambda group: [point] if group == point.group else [])
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    run_and_check(inputs(*SMALL))
    assert len(calls) == 1 and autotune._autotuner is not None
    assert {info["source"] for info in last_launches().values()} == {"user-cache"}


def test_packaging_declares_the_autotuner_entry_point():
    """pyproject.toml declares tuning's autotuner in the group gsa_kernels loads (an editable install
    made before the declaration does not list it: reinstall to refresh the metadata)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    points = project["entry-points"][autotune.ENTRY_POINT_GROUP]
    assert points == {"search": "tuning.autotuner:register"}
    assert importlib.metadata.EntryPoint("search", points["search"], autotune.ENTRY_POINT_GROUP).load() \
        is tuning.autotuner.register


def test_shipped_sm90_file_is_fresh_and_covers_the_promised_grid():
    """tuned_configs/sm90.yaml, as committed, the file of every sm90 GPU without its own: a GPU sweep
    (not a dry run) made for these kernels, candidate lists and Triton version (an edit to a kernel
    or a helper it calls makes that kernel's configs stale: it must come with its sweep), with an
    exact entry for every benchmark and common shape in bf16 and fp16. It is the H200's sweep (the
    H100's went stale with the grouped-heads kernels and no H100 was at hand to re-run it:
    tuned_configs/README.md)."""
    from gsa_kernels._paths import tuned_configs_dir
    doc = yaml.safe_load((tuned_configs_dir() / "sm90.yaml").read_text())
    meta, entries, stale = tuned_file.validate(doc, arch="sm90")      # raises FileProblem if malformed
    assert not stale, f"stale configs for {stale}: re-run the sweep for them"
    assert not meta["dry_run"] and meta["gpu"].startswith("NVIDIA H")
    _assert_covers(entries, "bench,common")


def test_shipped_h200_file_is_fresh_and_covers_the_promised_grid():
    """tuned_configs/sm90-nvidia-h200.yaml, as committed: a GPU sweep on an H200 for these kernels
    (none stale: an edit to a kernel must come with its sweep on the H200), with an exact entry for
    every benchmark, common and long shape in bf16 and fp16, and read first on an H200."""
    from gsa_kernels._paths import tuned_configs_dir
    from gsa_kernels.tuned_file import device_file_name
    name = device_file_name("sm90", problem_keys.device_slug("NVIDIA H200"))
    assert name == "sm90-nvidia-h200.yaml"
    doc = yaml.safe_load((tuned_configs_dir() / name).read_text())
    meta, entries, stale = tuned_file.validate(doc, arch="sm90", model="nvidia-h200")
    assert not stale, f"stale configs for {stale}: re-run the sweep on an H200 with --kernels {','.join(stale)}"
    assert not meta["dry_run"] and meta["gpu"] == "NVIDIA H200" and meta["complete"]
    _assert_covers(entries, "bench,common,long")


def _assert_covers(entries, grid: str, dtypes=("bfloat16", "float16")):
    """An exact entry for every shape of the sweep's preset grid, in each of dtypes."""
    have = {e.key for e in entries}
    for shape in shapes.parse_shapes(grid):
        for dtype in dtypes:
            key = problem_keys.problem_key(K=shape.K, V=shape.V, M=shape.M, dtype=dtype,
                                           tokens=shape.B * shape.T * shape.H, seqs=shape.B * shape.H)
            assert key in have, (shape, dtype)


def test_host_integer_helpers_match_triton():
    """gsa_kernels.intmath replaces triton.cdiv / next_power_of_2 on the launch path (they are slow
    constexpr functions from Python); the sizes and grids must not move."""
    from gsa_kernels import intmath
    values = list(range(0, 1100)) + [4095, 4096, 4097, 65535, 65536, 65537, 10 ** 9 + 7]
    for x in values:
        assert intmath.next_pow2(x) == triton.next_power_of_2(x), x
        assert intmath.pow2_at_least(x) == max(16, triton.next_power_of_2(x)), x
        for b in (1, 2, 3, 16, 32, 64, 132):
            assert intmath.cdiv(x, b) == triton.cdiv(x, b), (x, b)


def test_forward_only_kernels_are_tuned_on_a_no_grad_forward(monkeypatch):
    """The compact kernels launch only when no input requires grad (half inputs): the search finds
    them with a no-grad forward and times them on one ("infer"), gated on o."""
    kernel = "states_fwd_compact"
    param = two_valued_param(kernel)
    monkeypatch.setattr(candidates, "CANDIDATES", small_space({kernel: param}))
    st = search.Settings(kernels=(kernel,), compile_backend=False)
    res = search.tune_shape(B=1, T=32, H=1, K=16, V=16, M=16, dtype=torch.float16, device=DEVICE, settings=st)
    e = res["entry"]
    assert e["times_ms"][kernel]["op"] == "infer"
    assert e["candidates"][kernel] == {"timed": 2, "pruned": 0, "rejected": 0}
    assert e["configs"][kernel][param] in candidates.CANDIDATES[kernel][param]


def test_compile_worker_answers_line_by_line_and_is_killed_past_its_limit(tmp_path):
    """A `--serve` worker answers each request with one line; the parent kills one that runs past
    the limit or dies, and says why from its standard error (a stand-in process here)."""
    from tuning import compile_backend
    script = tmp_path / "serve.py"
    script.write_text(
        "import json, sys, time\n"
        "for line in sys.stdin:\n"
        "    cfg = json.loads(line)\n"
        "    if cfg.get('sleep'): time.sleep(cfg['sleep'])\n"
        "    if cfg.get('die'): sys.exit('worker died: ' + cfg['die'])\n"
        "    print('noise that is not an answer')\n"
        "    print(json.dumps({'echo': cfg['n']}), flush=True)\n")
    w = compile_backend.Worker((sys.executable, str(script)))
    assert [w.ask({"n": n}, timeout=30) for n in (1, 2)] == [{"echo": 1}, {"echo": 2}]   # one process
    assert w.ask({"n": 3, "sleep": 30}, timeout=0.5) is None and w.proc.poll() is not None
    w = compile_backend.Worker((sys.executable, str(script)))
    assert w.ask({"n": 4, "die": "boom"}, timeout=30) is None and "worker died: boom" in w.last_error()


def test_compile_runs_reuse_a_worker_after_success_and_replace_it_after_failure(monkeypatch):
    """`_run` borrows an idle worker and gives it back after a good answer; after an error, a crash or a
    kill the next shape gets a new process (a failure may leave CUDA or Dynamo in a bad state)."""
    from tuning import compile_backend
    made, answers = [], iter([{"fwd_ms": 1.0, "fwd_bwd_ms": 2.0}, {"error": "rejected"}, None, {"warm": True}])

    class FakeWorker:
        def __init__(self):
            made.append(self)
            self.closed = False

            class Proc:
                returncode = -9
            self.proc = Proc()

        def ask(self, cfg, timeout):
            res = next(answers)
            if res is None:
                self.closed = True
            return res

        def last_error(self):
            return "Killed"

        def close(self):
            self.closed = True
    monkeypatch.setattr(compile_backend, "Worker", FakeWorker)
    monkeypatch.setattr(compile_backend, "_idle", [])
    st = search.Settings()
    shape = shapes.Shape(1, 32, 1, 16, 16, 16)
    assert compile_backend._run(shape, "float16", st, warm=False) == {"fwd_ms": 1.0, "fwd_bwd_ms": 2.0}
    assert compile_backend._run(shape, "float16", st, warm=False) == {"error": "rejected"}
    assert len(made) == 1 and made[0].closed                    # reused once, closed after its failure
    assert compile_backend._run(shape, "float16", st, warm=False) == {"error": "failed (exit -9): Killed"}
    assert compile_backend._run(shape, "float16", st, warm=True) == {"warm": True}
    assert len(made) == 3 and compile_backend._idle == [made[2]]


def test_compile_worker_loop_resets_dynamo_per_shape_and_reports_exceptions(monkeypatch):
    """The worker's loop: Dynamo reset before every shape (a new shape compiles as in a fresh process),
    an exception becomes that shape's error line and the loop goes on."""
    import io
    import json
    from tuning import compile_backend
    resets, seen = [], []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))

    def fake_measure(cfg):
        seen.append(cfg["n"])
        if cfg["n"] == 2:
            raise RuntimeError("CUDA out of memory")
        return {"fwd_ms": float(cfg["n"]), "fwd_bwd_ms": 2.0 * cfg["n"]}
    monkeypatch.setattr(compile_backend, "measure_one", fake_measure)
    out = io.StringIO()
    compile_backend.serve(['{"n": 1}\n', "\n", '{"n": 2}\n', '{"n": 3}\n'], out)
    lines = [json.loads(ln) for ln in out.getvalue().splitlines()]
    assert seen == [1, 2, 3] and len(resets) == 3
    assert lines[0] == {"fwd_ms": 1.0, "fwd_bwd_ms": 2.0} and lines[2] == {"fwd_ms": 3.0, "fwd_bwd_ms": 6.0}
    assert lines[1]["error"].startswith("failed: RuntimeError: CUDA out of memory")


def test_compile_times_fills_in_entries_and_picks_the_backend_that_wins():
    """tuning.compile_times: the chunk entries of the dtypes asked for without compiled times are
    the work; a result writes both compiled times and the backend that wins by more than the tie
    window; an error, why; an older torch_compile note is replaced, other notes kept."""
    from tuning import compile_times
    def entry(op, dtype, times, notes=()):
        return {"op": op, "key": {"dtype": dtype}, "backend": "triton", "shape": [1, 64, 1, 16, 16, 16],
                "times_ms": {"triton_fwd": 1.0, "triton_fwd_bwd": 3.0, **times}, "notes": list(notes)}
    entries = [entry("chunk", "bfloat16", {}), entry("chunk", "bfloat16", {"torch_compile_fwd_bwd": 9.0}),
               entry("recurrent", "bfloat16", {}), entry("chunk", "float16", {})]
    assert compile_times.todo(entries, ["bfloat16"], retime=False) == [0]
    assert compile_times.todo(entries, ["bfloat16", "float16"], retime=True) == [0, 1, 3]
    old = entry("chunk", "bfloat16", {"torch_compile_fwd_bwd": 9.0}, notes=["torch_compile: old", "kept"])
    kw = dict(mode="default", tie=0.02, date="D")
    slower = compile_times.record(old, {"fwd_ms": 2.0, "fwd_bwd_ms": 6.0}, **kw)
    assert slower["backend"] == "triton" and slower["compile_mode"] == "default"
    assert slower["times_ms"]["torch_compile_fwd"] == 2.0 and slower["times_ms"]["torch_compile_fwd_bwd"] == 6.0
    assert slower["notes"][0] == "kept" and "2.00x" in slower["notes"][1] and len(slower["notes"]) == 2
    assert old["times_ms"]["torch_compile_fwd_bwd"] == 9.0                      # the input is left alone
    assert compile_times.record(old, {"fwd_ms": 0.5, "fwd_bwd_ms": 2.95}, **kw)["backend"] == "triton"  # a near-tie
    assert compile_times.record(old, {"fwd_ms": 0.5, "fwd_bwd_ms": 2.5}, **kw)["backend"] == "torch_compile"
    failed = compile_times.record(old, {"error": "not timed: compiling took over 300 s"}, **kw)
    assert "torch_compile_fwd_bwd" not in failed["times_ms"] and "compile_mode" not in failed
    assert failed["notes"][-1].startswith("torch_compile: not timed: compiling took over 300 s")


def test_compile_times_refuses_without_a_gpu(tmp_path, capsys):
    from tuning import compile_times
    f = tmp_path / "t.yaml"
    f.write_text("meta: {gpu: NVIDIA H200, arch: sm90, dry_run: false}\nentries: []\n")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    assert compile_times.main([str(f)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
