"""Tuning one problem shape: the candidate space, pruning, coordinate descent, tie-break.

Everything is driven by the candidate lists of `gsa_kernels.candidates` (kernel -> parameter ->
values) and by the names the launchers pass to `launch_config`; nothing here knows a kernel's
arguments. The unit timed is the real op with `launches.override` fixing every kernel's config:
`chunk_gsa` for the chunk kernels, `fused_recurrent_gsa` for the token-by-token ones (`Settings.op`
"recurrent": no chunk size, and at T = 1 its forward without gradients is the decode step):

1. Which kernel runs where: one forward and one backward with every kernel at its default config;
   `last_launches()` lists the kernels each launched, in launch order. A kernel launched only
   by the forward is timed by the forward; one launched only by the backward is timed by the backward
   alone (`torch.autograd.grad` on graphs retained from forwards made with the current forward
   configs, so the forward is not in its time); one launched by both is timed by forward+backward.
   A kernel of CANDIDATES that chunk_gsa never launches keeps its default config.
2. The chunk size BT (kernel "chunk") fixes the layout every other kernel works on, so it is the
   outer choice: every BT candidate is timed on forward+backward with the other kernels at their
   defaults for that BT, and the best `bt_top` (default 1) BTs go on to step 3.
3. Coordinate descent at each kept BT, `passes` times (default 1): for each kernel in launch order,
   time every candidate with the other kernels at their current best, keep the winner.
4. The kept BT whose tuned configs give the fastest forward+backward wins.

Pruning, before anything is compiled (rules by the naming grammar BT/BC/BK/BV/BM; other parameters
are pruned only as a known miscompile): a tile (BK, BV, BM) larger than the padded dim (pow2, at least
16) unless it is the smallest candidate; a chunk BT longer than the padded T unless it is the smallest
candidate; a sub-chunk BC larger than BT; a known Triton miscompile (`configs.miscompiled`: it can
give wrong results without an error, which no timing would notice); a config over
`gsa_kernels.resources.fits`'s shared memory or register estimate. A candidate that then fails to
compile or to launch is rejected with the error.

Near-ties: among the candidates within `tie` (default 2%) of the fastest, the default config wins if
it is one of them (a stable answer), else the earliest in enumeration order (CANDIDATES order:
parameters as declared, values as listed, smallest first there). The same rule picks BT, and the
torch.compile backend must beat the Triton kernels by more than `tie` to be chosen.
"""
from __future__ import annotations

import datetime
import itertools
import os
import platform
from dataclasses import dataclass, field

import torch
import triton

from gsa_kernels import candidates, configs, launches
from gsa_kernels.chunk import chunk_gsa
from gsa_kernels.fused_recurrent import fused_recurrent_gsa
from gsa_kernels.intmath import pow2_at_least
from gsa_kernels.kernel_hashes import kernel_hashes
from gsa_kernels.problem_keys import bucket, current_arch, dtype_name, problem_key
from gsa_kernels.resources import fits, recurrent_fits, resource_estimate
from gsa_kernels.tuned_file import FORMAT
from tuning import measure
from tuning.shapes import Shape

CHUNK = "chunk"   # the pseudo-kernel holding BT, the chunk size every launch of one call shares
TILE_DIMS = {"BK": "K", "BV": "V", "BM": "M", "BMS": "M", "BKS": "K", "BVS": "V"}


@dataclass
class Settings:
    max_candidates: int | None = None   # per kernel and BT, after pruning; None: all
    passes: int = 1
    bt_top: int = 1
    tie: float = 0.02
    jobs: int = 0                        # parallel compile workers (CUDA only); 0: compile on first launch
    compile_backend: bool = True         # time torch.compile(chunk_gsa_torch) too
    compile_mode: str = "default"        # in this mode (tuned_file.COMPILE_MODES): the cheapest compile
    compile_timeout: float = 300.0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    kernels: tuple | None = None         # kernels to tune; others stay at their start configs
    # start configs per problem key (problem_keys.problem_key) instead of the defaults, from an
    # earlier tuned file (sweep --seed): with `kernels`, the kernels not tuned keep that file's configs
    # (and its chunk size, unless "chunk" is tuned), so a change to some kernels re-tunes only theirs
    seed: dict | None = None
    seeded_from: str | None = None       # that file's date, recorded in the meta
    compiler: object | None = None       # a tuning.precompile.Compiler open for the whole sweep
    # {(shape as a tuple, dtype): why} of the compiled forms whose up-front compile failed
    # (compile_backend.warm_in_subprocesses): not compiled again, the entry says why
    compile_failed: dict | None = None
    op: str = "chunk"                    # candidates.OPS: chunk_gsa's kernels or fused_recurrent_gsa's

    def as_meta(self) -> dict:
        meta = {"max_candidates": self.max_candidates, "passes": self.passes, "bt_top": self.bt_top,
                "tie": self.tie, "warmup_ms": self.warmup_ms, "rep_ms": self.rep_ms,
                "compile_backend": self.compile_backend and self.op == "chunk", "compile_mode": self.compile_mode,
                "kernels": list(self.kernels) if self.kernels else "all", "op": self.op}
        if self.seed is not None:
            meta["seeded_from"] = self.seeded_from
        return meta


def run_meta(*, arch: str, dry_run: bool, device, settings: Settings | None = None) -> dict:
    """The `meta` block: where, with what software and how a file's entries were measured."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu, sm_count = props.name, props.multi_processor_count
    else:
        gpu, sm_count = f"none (Triton interpreter on {platform.machine()} CPU)", 0
    meta = {"format": FORMAT, "arch": arch, "gpu": gpu, "sm_count": sm_count,
            "device": device.type, "triton": str(triton.__version__), "torch": str(torch.__version__),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "dry_run": bool(dry_run), "complete": False, "kernel_hashes": dict(kernel_hashes()),
            "candidates": {k: candidates.candidates_hash(k) for k in candidates.all_candidates()}}
    if settings is not None:
        meta["search"] = settings.as_meta()
    return meta


# ---------------------------------------------------------------------------------------------
# the candidate space
# ---------------------------------------------------------------------------------------------

def enumerate_space(kernel: str) -> list[dict]:
    params = candidates.all_candidates()[kernel]
    return [dict(zip(params, values)) for values in itertools.product(*params.values())]


def prune(kernel: str, cfgs: list[dict], *, shape: Shape, dtype: str, BT: int | None,
          arch: str | None) -> tuple[list[dict], list[str]]:
    """(kept, reasons pruned) by the rules of the module docstring."""
    params = candidates.all_candidates()[kernel]
    dims = {"K": shape.K, "V": shape.V, "M": shape.M}
    kept, pruned = [], []
    for cfg in cfgs:
        why = None
        for p, dim in TILE_DIMS.items():
            if p in cfg and cfg[p] > pow2_at_least(dims[dim]) and cfg[p] != min(params[p]):
                why = f"{p}={cfg[p]} > pow2({dim}={dims[dim]})"
        if kernel == CHUNK and cfg["BT"] > pow2_at_least(shape.T) and cfg["BT"] != min(params["BT"]):
            why = f"BT={cfg['BT']} > pow2(T={shape.T})"
        if "BC" in cfg and BT is not None and cfg["BC"] > BT:
            why = f"BC={cfg['BC']} > BT={BT}"
        if why is None and configs.miscompiled(kernel, cfg, BT):
            why = f"num_warps=8 at BT={BT}: a Triton 3.6 miscompile (configs.miscompiled)"
        if why is None and candidates.op_of(kernel) == "recurrent":
            if not recurrent_fits(kernel, cfg, K=shape.K, V=shape.V, M=shape.M):
                why = "state tile over the registers of its warps (resources.recurrent_fits)"
        elif why is None and kernel != CHUNK:
            bt = BT if BT is not None else 64
            if not fits(cfg, K=shape.K, V=shape.V, M=shape.M, BT=bt, dtype=dtype, arch=arch):
                smem, regs = resource_estimate(cfg, K=shape.K, V=shape.V, M=shape.M, BT=bt, dtype=dtype)
                why = f"estimate smem {smem} B / {regs:.0f} regs per thread does not fit"
        if why is None:
            kept.append(cfg)
        else:
            pruned.append(f"{fmt(cfg)}: {why}")
    return kept, pruned


def cap(cfgs: list[dict], start: dict, n: int | None) -> list[dict]:
    """At most n configs: the start config, then evenly spaced others; enumeration order kept."""
    if n is None or len(cfgs) <= n:
        return cfgs
    rest = [c for c in cfgs if c != start]
    picks = [start] if start in cfgs else []
    k = n - len(picks)
    if k > 0:
        picks += [rest[round(j * (len(rest) - 1) / max(1, k - 1))] for j in range(k)] if k > 1 else [rest[0]]
    return [c for c in cfgs if c in picks]


def fmt(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items())


def tie_break(timed: list[tuple[dict, float]], order: list[dict], start: dict | None, tie: float):
    """(winner, winner ms, runner-up ms or None) by the near-tie rule of the module docstring."""
    best = min(ms for _, ms in timed)
    near = [(c, ms) for c, ms in timed if ms <= best * (1 + tie)]
    chosen = next(((c, ms) for c, ms in near if c == start), None)
    if chosen is None:
        chosen = min(near, key=lambda cm: order.index(cm[0]))
    others = [ms for c, ms in timed if c != chosen[0]]
    return chosen[0], chosen[1], (min(others) if others else None)


# ---------------------------------------------------------------------------------------------
# one shape
# ---------------------------------------------------------------------------------------------

class _CudaBroken(RuntimeError):
    pass


@dataclass
class _Failure:
    """What `_run` returns instead of raising when a candidate fails to compile or launch."""
    reason: str




def default_start(kernel: str, shape: Shape, BT) -> dict:
    d = configs.default_config(kernel, shape.K, shape.V, shape.M, BT, seqs=shape.B * shape.H)
    if "BC" in d and BT is not None:
        d["BC"] = min(d["BC"], BT)
    return d


def shape_seed(shape: Shape, dtype: str, settings: Settings) -> dict | None:
    """This shape's configs in the seed file (sweep --seed), if any."""
    key = problem_key(K=shape.K, V=shape.V, M=shape.M, dtype=dtype, tokens=shape.B * shape.T * shape.H,
                      seqs=shape.B * shape.H)
    return (settings.seed or {}).get((settings.op, key))


def kernel_space(kernel: str, BT, shape: Shape, dtype: str, settings: Settings, arch, seed) -> tuple:
    """(candidates, pruned reasons, start config) of a kernel at chunk size BT."""
    kept, pruned = prune(kernel, enumerate_space(kernel), shape=shape, dtype=dtype, BT=BT, arch=arch)
    start = default_start(kernel, shape, BT) if kernel != CHUNK else {"BT": configs.default_config(
        CHUNK, shape.K, shape.V, shape.M)["BT"]}
    if seed is not None and kernel in seed and (kernel == CHUNK or CHUNK not in seed or BT == seed[CHUNK]["BT"]):
        # a parameter added since the seed was made takes its default (not the first candidate)
        params = candidates.all_candidates()[kernel]
        seeded = {p: seed[kernel].get(p, start.get(p)) for p in params}
        if seeded in kept:
            start = seeded
    if start not in kept:
        start = kept[0] if kept else start
    if settings.kernels is not None and kernel not in settings.kernels:
        return [start], pruned, start
    return cap(kept, start, settings.max_candidates), pruned, start


def compile_plan(shape: Shape, dtype: str, settings: Settings, arch) -> list[tuple]:
    """The config sets a search of this shape will run, as far as they are known before any timing:
    every chunk size with the other kernels at their start configs, then each tuned kernel's
    candidates at the start chunk size (the one coordinate descent refines unless another BT wins
    step 2). Tasks (label, configs override, phase) for tuning/precompile.py."""
    seed = shape_seed(shape, dtype, settings)
    space = candidates.op_candidates(settings.op)
    kernels = [k for k in space if k != CHUNK]
    if CHUNK in space:
        bts, _, bt_start = kernel_space(CHUNK, None, shape, dtype, settings, arch, seed)
        bts, BT0 = [bt["BT"] for bt in bts], bt_start["BT"]
    else:
        bts, BT0 = [None], None

    def full(BT, cfgs):
        return {**cfgs, CHUNK: {"BT": BT}} if CHUNK in space else cfgs

    tasks = []
    for BT in bts:
        spaces = {k: kernel_space(k, BT, shape, dtype, settings, arch, seed) for k in kernels}
        starts = {k: space[2] for k, space in spaces.items()}
        tasks.append((("BT", BT), full(BT, starts), "all"))
        if BT == BT0:
            tasks += [((BT, k, fmt(c)), full(BT, {**starts, k: c}), "all")
                      for k, space in spaces.items() for c in space[0] if c != starts[k]]
    return tasks


@dataclass
class _Kernel:
    name: str
    phase: str                              # "fwd", "bwd", "fwd+bwd" or "infer" (a forward under no_grad)
    timed: int = 0
    pruned: list = field(default_factory=list)
    rejected: list = field(default_factory=list)


class ShapeSearch:
    def __init__(self, shape: Shape, dtype: str, device, settings: Settings, progress=None, arch=None):
        self.shape, self.dtype, self.device, self.s = shape, dtype, torch.device(device), settings
        self.arch = arch
        self.progress = progress or (lambda n=1: None)
        self.inputs = measure.Inputs(shape, dtype, self.device, states=settings.op == "recurrent")
        self.ref = measure.Reference(self.inputs)
        self.timer = measure.Timer(self.device, settings.warmup_ms, settings.rep_ms)
        self.op = settings.op
        self.fn = chunk_gsa if settings.op == "chunk" else fused_recurrent_gsa      # the op timed
        self.space_all = candidates.op_candidates(settings.op)
        self.tunable = [k for k in self.space_all if settings.kernels is None or k in settings.kernels]
        self.seed = shape_seed(shape, dtype, settings)
        self.checked: dict = {}              # (BT, kernel, cfg) -> None or reason
        self._graphs = None                  # (fwd-config key, [(o, xs)]) retained for backward timing
        # the parallel precompile only warms Triton's cache: a candidate failing there is still tried
        # (and rejected) here, so a broken worker can never reject a good config
        self.precompile_failures = 0
        self.notes: list[str] = []

    # -- ops under a full override ---------------------------------------------------------
    def _fwd(self, xs):
        return self.fn(*xs)[0]

    def _infer(self, xs, state=None):
        """The forward-only path (its own kernels: half inputs, the decode step); from `state` (the
        recurrent op's, measure.Inputs) it returns (o, final states), else o."""
        with torch.no_grad():
            if state is None:
                return self.fn(*xs)[0]
            return self.fn(*xs, initial_state=state, output_final_state=True)

    def _run(self, cfgs: dict, fn):
        try:
            with launches.override(cfgs):
                return fn()
        except torch.OutOfMemoryError:
            raise
        except Exception as e:                       # compile or launch failure of this candidate
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            if "CUDA error" in str(e) or "illegal" in str(e).lower():
                raise _CudaBroken(msg) from e        # the context is gone: stop, do not blame the config
            return _Failure(msg)

    def _full(self, BT, current: dict) -> dict:
        out = {k: dict(v) for k, v in current.items()}
        if CHUNK in self.space_all:
            out[CHUNK] = {"BT": BT}
        return out

    def default_start(self, kernel: str, BT) -> dict:
        return default_start(kernel, self.shape, BT)

    def space(self, kernel: str, BT) -> tuple[list[dict], list[str], dict]:
        """(candidates, pruned reasons, start config) of a kernel at chunk size BT."""
        return kernel_space(kernel, BT, self.shape, self.dtype, self.s, self.arch, self.seed)

    def discover(self, BT0) -> None:
        """Which kernels the forward and the backward launch, in launch order (module docstring, 1)."""
        start = {k: self.space(k, BT0)[2] for k in self.space_all if k != CHUNK}
        cfgs = self._full(BT0, start)
        xs, do = self.inputs.sets[0], self.inputs.do
        launches.clear_launches()
        o = self._run(cfgs, lambda: self._fwd(xs))
        if isinstance(o, _Failure):
            raise RuntimeError(f"the default configs do not run at {self.shape} {self.dtype}: {o.reason}")
        fwd = list(launches.last_launches())
        launches.clear_launches()
        self._run(cfgs, lambda: torch.autograd.grad(o, xs, do))
        bwd = list(launches.last_launches())
        launches.clear_launches()
        self._run(cfgs, lambda: self._infer(xs, self._state(0)))
        infer = [name for name in launches.last_launches() if name not in fwd]
        self.kernels = []
        for name in dict.fromkeys(fwd + bwd + infer):
            if name == CHUNK:
                continue
            if name in infer:
                phase = "infer"
            else:
                phase = "fwd+bwd" if (name in fwd and name in bwd) else ("fwd" if name in fwd else "bwd")
            self.kernels.append(_Kernel(name, phase))
        launched = {k.name for k in self.kernels} | {CHUNK}
        for name in self.space_all:
            if name not in launched and self.op == "chunk":
                self.notes.append(f"{name}: not launched by chunk_gsa; default config kept")

    # -- timing and the gate -----------------------------------------------------------------
    def _fwd_graphs(self, cfgs):
        key = repr(sorted((k, sorted(v.items())) for k, v in cfgs.items()
                          if k == CHUNK or self._phase(k) != "bwd"))
        if self._graphs is None or self._graphs[0] != key:
            self._graphs = None
            graphs = []
            for xs in self.inputs.sets:
                o = self._run(cfgs, lambda xs=xs: self._fwd(xs))
                if isinstance(o, _Failure):
                    return o
                graphs.append((o, xs))
            self._graphs = (key, graphs)
        return self._graphs[1]

    def _state(self, i):
        return None if self.inputs.states is None else self.inputs.states[i]

    def _phase(self, name):
        return next((k.phase for k in self.kernels if k.name == name), "fwd")

    def measure(self, cfgs: dict, phase: str, gate_key=None) -> tuple[float | None, str | None]:
        """(ms, None) or (None, reason): check once per gate_key, then time the op of `phase`."""
        do = self.inputs.do
        if phase == "bwd":
            graphs = self._fwd_graphs(cfgs)
            if isinstance(graphs, _Failure):
                return None, f"forward failed: {graphs.reason}"
            fns = [lambda o=o, xs=xs: torch.autograd.grad(o, xs, do, retain_graph=True) for o, xs in graphs]
            first = lambda: (graphs[0][0], fns[0]())                           # noqa: E731
        elif phase == "infer" and self.inputs.states is not None:
            fns = [lambda i=i, xs=xs: self._infer(xs, self._state(i)) for i, xs in enumerate(self.inputs.sets)]
            first = fns[0]                                                     # (o, final states)
        elif phase in ("fwd", "infer"):
            op = self._fwd if phase == "fwd" else self._infer
            fns = [lambda xs=xs, op=op: op(xs) for xs in self.inputs.sets]
            first = lambda: (fns[0](), None)                                   # noqa: E731
        else:
            def fwd_bwd(xs):
                o = self._fwd(xs)
                return o, torch.autograd.grad(o, xs, do)
            fns = [lambda xs=xs: fwd_bwd(xs) for xs in self.inputs.sets]
            first = fns[0]
        if gate_key is None or gate_key not in self.checked:
            out = self._run(cfgs, first)
            if isinstance(out, _Failure):
                reason = out.reason
            elif phase == "infer" and self.inputs.states is not None:
                reason = measure.check(self.ref, out[0], final_state=out[1])
            else:
                reason = measure.check(self.ref, out[0], out[1])
            if gate_key is not None:
                self.checked[gate_key] = reason
            if reason is not None:
                return None, reason
        elif self.checked[gate_key] is not None:
            return None, self.checked[gate_key]
        if self.op == "recurrent" and phase == "infer":
            # the decode step and short prompts run a few small launches: an eager call is mostly host
            # time (~60-120 us against ~20 us of kernels at B = 1), so they are timed in a CUDA graph
            ms = self._run(cfgs, lambda: self.timer.graphed(fns))
        else:
            ms = self._run(cfgs, lambda: self.timer(measure.rotating(fns)))
        launches.count("autotune_benchmarks")
        self.progress(1)
        if isinstance(ms, _Failure):
            return None, ms.reason
        return ms, None

    # -- the search ----------------------------------------------------------------------------
    def run(self) -> dict:
        bt_space = self.space(CHUNK, None) if CHUNK in self.space_all else ([{"BT": None}], [], {"BT": None})
        bts, bt_pruned, bt_start = bt_space
        self.discover(bt_start["BT"])
        precompile = self._precompiler()

        # 2. chunk size, others at their defaults
        starts = {bt["BT"]: {k.name: self.space(k.name, bt["BT"])[2] for k in self.kernels} for bt in bts}
        warmed = self.s.compiler is not None and (self.shape, self.dtype) in self.s.compiler.warmed
        if precompile and not warmed:
            self.precompile_failures += len(precompile([(("BT", bt["BT"]), self._full(bt["BT"], starts[bt["BT"]]),
                                                         "fwd+bwd") for bt in bts]))
        stage = []
        bt_rejected = []
        for bt in bts:
            ms, why = self.measure(self._full(bt["BT"], starts[bt["BT"]]), "fwd+bwd", gate_key=("BT", bt["BT"]))
            if ms is None:
                bt_rejected.append(f"{fmt(bt)}: {why}")
            else:
                stage.append((bt, ms))
        if not stage:
            return {"entry": None, "failed": "no chunk size passed: " + "; ".join(bt_rejected)}
        ranked = sorted(stage, key=lambda bm: bm[1])
        kept = [bt for bt, _ in ranked[:max(1, self.s.bt_top)]]

        # 3. coordinate descent per kept BT
        results = {}
        for bt in kept:
            BT = bt["BT"]
            current = dict(starts[BT])
            spaces = {k.name: self.space(k.name, BT) for k in self.kernels}
            for k in self.kernels:
                k.pruned = spaces[k.name][1]
            if precompile and not (warmed and BT == bt_start["BT"]):    # else compile_plan had them
                tasks = [((BT, k.name, fmt(c)), self._full(BT, {**current, k.name: c}), k.phase)
                         for k in self.kernels if k.name in self.tunable for c in spaces[k.name][0]]
                self.precompile_failures += len(precompile(tasks))
            times = {}
            for _ in range(self.s.passes):
                for k in self.kernels:
                    cands, _, start = spaces[k.name]
                    timed = []
                    for c in cands:
                        cfgs = self._full(BT, {**current, k.name: c})
                        ms, why = self.measure(cfgs, k.phase, gate_key=(BT, k.name, fmt(c)))
                        if ms is None:
                            if f"{fmt(c)}: {why}" not in k.rejected:
                                k.rejected.append(f"{fmt(c)}: {why}")
                        else:
                            timed.append((c, ms))
                    k.timed = len(timed)
                    if not timed:
                        return {"entry": None, "failed": f"{k.name} at BT={BT}: no candidate passed ("
                                + "; ".join(k.rejected[:3]) + ")"}
                    win, win_ms, ru_ms = tie_break(timed, cands, start, self.s.tie)
                    current[k.name] = win
                    times[k.name] = {"winner": round(win_ms, 4), "runner_up": _r(ru_ms), "op": k.phase}
            total, why = self.measure(self._full(BT, current), "fwd+bwd")
            fwd, _ = self.measure(self._full(BT, current), "fwd")
            if total is None:
                return {"entry": None, "failed": f"tuned configs at BT={BT} failed: {why}"}
            results[BT] = (current, times, total, fwd)

        # 4. the chunk size
        bt_timed = [({"BT": BT}, r[2]) for BT, r in results.items()]
        if len(bt_timed) == 1:      # BT chosen by step 2: report step 2's times
            bt_win = kept[0]
            bt_win_ms = dict((fmt(b), ms) for b, ms in stage)[fmt(bt_win)]
            others = [ms for b, ms in stage if b != bt_win]
            bt_ru = min(others) if others else None
            op = "fwd+bwd, other kernels at their defaults"
        else:
            bt_win, bt_win_ms, bt_ru = tie_break(bt_timed, bts, bt_start, self.s.tie)
            op = "fwd+bwd, other kernels tuned"
        current, times, total, fwd = results[bt_win["BT"]]
        self._graphs = None
        return self._entry(bt_win, current, times, total, fwd, bt_win_ms, bt_ru, op, bt_pruned, bt_rejected,
                           len(stage))

    def _entry(self, bt_win, current, times, total, fwd, bt_win_ms, bt_ru, op, bt_pruned, bt_rejected,
               bt_timed) -> dict:
        sh = self.shape
        all_cfgs = {}
        # a chunk entry names every chunk kernel (defaults for those the shape did not launch); a
        # recurrent entry the kernels its shape launched
        for name in (self.space_all if self.op == "chunk" else current):
            if name == CHUNK:
                all_cfgs[name] = dict(bt_win)
            elif name in current:
                all_cfgs[name] = dict(current[name])
            else:
                all_cfgs[name] = self.default_start(name, bt_win["BT"])
        times_ms = {}
        if CHUNK in self.space_all:
            times_ms[CHUNK] = {"winner": round(bt_win_ms, 4), "runner_up": _r(bt_ru), "op": op}
        times_ms.update(times)
        times_ms["triton_fwd"] = _r(fwd)
        times_ms["triton_fwd_bwd"] = round(total, 4)
        counts, rejected = {}, {}
        if CHUNK in self.space_all:
            counts[CHUNK] = {"timed": bt_timed, "pruned": len(bt_pruned), "rejected": len(bt_rejected)}
            if bt_rejected:
                rejected[CHUNK] = bt_rejected
        for k in self.kernels:
            counts[k.name] = {"timed": k.timed, "pruned": len(k.pruned), "rejected": len(k.rejected)}
            if k.rejected:
                rejected[k.name] = k.rejected
        entry = {
            "op": self.op,
            "key": {"K": sh.K, "V": sh.V, "M": sh.M, "dtype": self.dtype,
                    "tokens": bucket(sh.B * sh.T * sh.H), "seqs": bucket(sh.B * sh.H)},
            "shape": sh.as_list(),
            "backend": "triton",
            "configs": all_cfgs,
            "times_ms": times_ms,
            "candidates": counts,
        }
        if rejected:
            entry["rejected"] = rejected
        notes = list(self.notes)
        if self.precompile_failures:
            notes.append(f"parallel precompile: {self.precompile_failures} tasks failed in workers "
                         f"(tried again here; rejections above are from this process)")
        if self.s.compile_backend and self.op == "chunk":
            from tuning import compile_backend
            res = compile_backend.measure_in_subprocess(sh, self.dtype, self.s)
            if res.get("error"):
                notes.append(f"torch_compile: {res['error']}")
            else:
                times_ms["torch_compile_fwd"] = res["fwd_ms"]
                times_ms["torch_compile_fwd_bwd"] = res["fwd_bwd_ms"]
                entry["compile_mode"] = self.s.compile_mode
                if compile_backend.wins(res["fwd_bwd_ms"], total, self.s.tie):
                    entry["backend"] = "torch_compile"
            self.progress(2)
        elif self.op == "chunk":
            notes.append("torch_compile: not timed (" + ("dry run" if self.device.type != "cuda"
                                                         else "--compile-backend off") + ")")
        entry["notes"] = notes
        return {"entry": entry, "failed": None}

    def _precompiler(self):
        if self.op != "chunk":
            return None               # the workers run chunk_gsa (tuning/precompile.py)
        if self.s.compiler is not None:
            return lambda tasks: self.s.compiler.compile(tasks, self.shape, self.dtype)
        if self.s.jobs <= 0 or self.device.type != "cuda":
            return None
        from tuning import precompile

        def once(tasks):       # a pool for this call alone (the run-time autotuner tunes one shape)
            with precompile.Compiler(self.s.jobs) as compiler:
                return compiler.compile(tasks, self.shape, self.dtype)
        return once


def _r(x):
    return None if x is None else round(x, 4)


def units(shape: Shape, dtype: str, settings: Settings, arch=None) -> int:
    """How many timings tuning this shape will take (for the progress bar's ETA); an estimate."""
    space = candidates.op_candidates(settings.op)
    bts = [c["BT"] for c in prune(CHUNK, enumerate_space(CHUNK), shape=shape, dtype=dtype, BT=None,
                                  arch=arch)[0]] if CHUNK in space else [None]
    n = len(bts) + 2 * min(settings.bt_top, len(bts))
    BT = bts[0]
    for k in space:
        if k == CHUNK or (settings.kernels and k not in settings.kernels):
            continue
        kept = prune(k, enumerate_space(k), shape=shape, dtype=dtype, BT=BT, arch=arch)[0]
        n += min(len(kept), settings.max_candidates or len(kept)) * settings.passes * min(settings.bt_top, len(bts))
    return n + (2 if settings.compile_backend and settings.op == "chunk" else 0)


def run_time_settings(device, max_candidates: int | None) -> Settings:
    """The opt-in run-time autotuner's search: parallel compiles on a GPU, no compile backend (a
    model's first call must not wait for torch.compile), at most max_candidates per kernel (None: all)."""
    on_gpu = torch.device(device).type == "cuda"
    return Settings(jobs=min(8, (os.cpu_count() or 2) // 2) if on_gpu else 0, compile_backend=False,
                    max_candidates=max_candidates)


def tune_shape(*, B, T, H, K, V, M, dtype, device, settings: Settings | None = None, progress=None) -> dict:
    """Tune one shape: {"entry": dict or None, "failed": reason or None}. Used by the sweep and by
    the opt-in autotuning of gsa_kernels (GSA_KERNELS_AUTOTUNE=1); settings None: the whole space
    at run_time_settings."""
    device = torch.device(device)
    if settings is None:
        settings = run_time_settings(device, None)
    shape = Shape(B, T, H, K, V, M)
    arch = current_arch() if device.type == "cuda" else None
    try:
        with torch.enable_grad():      # the run-time autotuner may be called under no_grad
            search = ShapeSearch(shape, dtype_name(dtype), device, settings, progress, arch=arch)
            return search.run()
    except _CudaBroken as e:
        raise RuntimeError(f"CUDA failed while tuning {shape} {dtype}: {e}") from e
