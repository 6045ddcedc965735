"""Run-time side of tuning: read the tuned YAML once, key a problem to an entry, fall back safely.

Where a launch config comes from, first match wins (`launch_config` in configs.py asks `lookup`):

1. an active `override({kernel: cfg})` (the sweep and the opt-in autotuner time candidates this way);
2. the tuned file: `$GSA_TUNED_CONFIGS` if set (the words `none`/`off` or an empty value: no file),
   else `tuned_configs/<arch>.yaml` for the present GPU (gsa_kernels._paths); an entry whose key
   equals the problem's key is used as is: no autotuning, no benchmark;
3. the user cache, `$GSA_KERNELS_CACHE_DIR/<arch>.yaml` (default `~/.cache/gsa_kernels`): entries the
   opt-in autotuner measured on this machine, exact key;
4. with `GSA_KERNELS_AUTOTUNE=1` only: `chunk_gsa` tunes the missing key on the spot (tuning.search),
   writes it to the user cache, and it becomes case 3 for this and every later process;
5. the nearest entry of 2 and 3 (distance below) whose configs fit the problem's dims;
6. `configs.default_config`.

Key of a problem: (K, V, M, dtype, tokens, seqs), with tokens = B*T*H (token-heads: the chunk kernels'
work, their grid is tokens / BT) and seqs = N*H (sequence-heads: the state walks' parallelism, which
is what separates shape a [8, 2048, 4] from shape c [2, 8192, 4] at equal tokens), each rounded to
the nearest power of two (`bucket`). Both are bucketed because time per token is flat within a factor
sqrt(2) and the file must stay small.

Nearest distance between a problem and an entry (smaller is nearer, ties go to the earlier entry):
    |log2 K - log2 K'| + |log2 V - log2 V'| + 2 |log2 M - log2 M'|
    + 0.5 |log2 tokens - log2 tokens'| + 0.5 |log2 seqs - log2 seqs'| + dtype term,
dtype term 0 (same), 1 (float16 vs bfloat16: same tile economics), 4 (half vs float32: IEEE dots).
M weighs double because BM = pow2(M) sizes every tile of every kernel; the work-size buckets weigh
half because they move the best config least. A nearest entry is only taken if every kernel's config
passes `fits` at the problem's dims, so a config tuned for a small M never overflows at a large one.

A file is used only when it is well-formed (`validate`: any break of the schema, anywhere, and a
file over MAX_FILE_BYTES count as malformed), made for this arch (when a GPU is present) and by this
Triton version. Staleness is per kernel: a kernel's configs are used only when the file was measured
on the same source of that kernel and the helpers it calls (`kernel_hashes`) and with the same
candidate list (`candidates_hash`); the other kernels of the same entries stay in use. Anything
unusable gives one `warnings.warn` per file and the fallback (user cache, nearest, default): never an
exception at launch and never a silently used stale config. The
torch.compile backend (an entry with `backend: torch_compile`) is honoured only for an exact key
from a file made with the same torch major.minor; everywhere else the Triton kernels run.

The lookup is cached per key; `reset()` forgets everything read (tests, or after changing the env).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

from gsa_kernels._paths import tuned_configs_dir
from gsa_kernels.intmath import pow2_at_least
from gsa_kernels.kernel_hashes import kernel_hashes

FORMAT = 2             # 2: per-kernel source hashes (meta.kernel_hashes) instead of one for all files
# A tuned file holds some kilobytes per entry; past this it is not a file the sweep wrote, and parsing
# it would hold the lookup lock for minutes
MAX_FILE_BYTES = 4 << 20
# Largest dim or work size a key may name (2^40 token-heads); beyond it, log-space distances overflow
MAX_KEY_VALUE = 1 << 40
ENV_FILE = "GSA_TUNED_CONFIGS"
ENV_AUTOTUNE = "GSA_KERNELS_AUTOTUNE"
ENV_CACHE_DIR = "GSA_KERNELS_CACHE_DIR"
BACKENDS = ("triton", "torch_compile")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KEY_FIELDS = ("K", "V", "M", "dtype", "tokens", "seqs")

# Shared memory per block by arch (bytes), for `fits`; unknown archs and the interpreter get sm90's.
SMEM_BYTES = {"sm80": 166912, "sm86": 101376, "sm87": 166912, "sm89": 101376, "sm90": 232448,
              "sm100": 232448, "sm120": 101376}
# Estimated live float32 values per thread above which a config is pruned: twice the 255-register
# file, so anything pruned would spill at least as much as it keeps (see `fits`).
MAX_REGS_PER_THREAD = 512

_lock = threading.RLock()


# ---------------------------------------------------------------------------------------------
# keys, hashes, resource estimate
# ---------------------------------------------------------------------------------------------

def current_arch() -> str | None:
    """`sm<major><minor>` of the current CUDA device, None without one (the interpreter has no arch)."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def dtype_name(dtype) -> str:
    for name, dt in DTYPES.items():
        if dtype == dt or dtype == name:
            return name
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def bucket(n: int) -> int:
    """n rounded to the nearest power of two (in log space), at least 1."""
    return 1 << max(0, round(math.log2(max(1, int(n)))))


def problem_key(*, K, V, M, dtype, tokens=None, seqs=None) -> tuple:
    """(K, V, M, dtype name, tokens bucket or None, seqs bucket or None)."""
    return (int(K), int(V), int(M), dtype_name(dtype),
            None if tokens is None else bucket(tokens), None if seqs is None else bucket(seqs))


def candidates_hash(kernel: str) -> str:
    from gsa_kernels.configs import CANDIDATES
    text = json.dumps(CANDIDATES[kernel], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resource_estimate(cfg: dict, *, K: int, V: int, M: int, BT: int, dtype) -> tuple[int, float]:
    """(shared memory bytes, live float32 values per thread) a kernel config is estimated to need.

    Generic, by the naming grammar only (BT chunk, BK/BV tiles of K/V, BM = pow2(M) slots); a
    parameter a kernel does not have counts 0. Per pipelined loop iteration a kernel loads a row tile
    [BT, BK] (or [BT, BV]) of the inputs and a state tile [BK, BM] (or [BM, BV]) in float32; the K and
    V loops of a kernel run one after the other, and Triton keeps num_stages copies in shared memory:
        smem = num_stages * (BT * max(BK, BV) * itemsize + max(BK, BV) * BM * 4)
    (on the H100, chunk_fwd at BT 32, BK = BV = 128, M 64, 3 stages: estimated 123 KB, compiled 98-119 KB).
    The live accumulators of a chunk program are the [BT, BT] intra-chunk matrix, about three
    [BT, BM] score/probability/gate tiles and the two state tiles, spread over 32 * num_warps threads:
        regs = (BT * BT + 3 * BT * BM + BM * (BK + BV)) / (32 * num_warps)
    Both are estimates, not bounds: a config that passes and still fails to compile is caught at
    compile time and rejected there.
    """
    item = 4 if dtype_name(dtype) == "float32" else 2
    BM = pow2_at_least(M)
    BK, BV = cfg.get("BK", 0), cfg.get("BV", 0)
    stages, warps = cfg.get("num_stages", 1), cfg.get("num_warps", 4)
    tile = max(BK, BV)
    smem = stages * (BT * tile * item + tile * BM * 4)
    regs = (BT * BT + 3 * BT * BM + BM * (BK + BV)) / (32 * warps)
    return smem, regs


def fits(cfg: dict, *, K: int, V: int, M: int, BT: int, dtype, arch: str | None = None) -> bool:
    """Whether a config passes the resource estimate on `arch` (default: the present one)."""
    smem, regs = resource_estimate(cfg, K=K, V=V, M=M, BT=BT, dtype=dtype)
    limit = SMEM_BYTES.get(arch or current_arch() or "sm90", SMEM_BYTES["sm90"])
    return smem <= limit and regs <= MAX_REGS_PER_THREAD


# ---------------------------------------------------------------------------------------------
# overrides (the sweep's and the autotuner's handle on every launch), counters, last launches
# ---------------------------------------------------------------------------------------------

_stats = {"autotune_benchmarks": 0, "autotune_runs": 0, "files_read": 0}


class _PerThread(threading.local):
    """What one thread has asked for and done: its active override and its launch records. Per
    thread, so that a sweep or autotune in one thread never steers another thread's launches, and
    `last_launches()` answers for the thread that asks."""

    def __init__(self):
        self.override: dict[str, dict] | None = None
        self.launches: dict[str, dict] = {}


_thread = _PerThread()


@contextlib.contextmanager
def override(configs: dict[str, dict]):
    """Within the block, in this thread, every kernel named in `configs` launches with that config,
    and chunk_gsa runs the Triton kernels (no backend dispatch, no opt-in autotuning). Nested blocks
    add to the outer one. Kernels not named keep their normal lookup; other threads are unaffected."""
    from gsa_kernels.configs import CANDIDATES
    for kernel, cfg in configs.items():
        if kernel not in CANDIDATES:
            raise KeyError(f"override: unknown kernel {kernel!r}; known: {sorted(CANDIDATES)}")
        if set(cfg) != set(CANDIDATES[kernel]):
            raise ValueError(f"override: config of {kernel!r} must set {sorted(CANDIDATES[kernel])}, "
                             f"got {sorted(cfg)}")
    previous = _thread.override
    _thread.override = {**(previous or {}), **{k: dict(v) for k, v in configs.items()}}
    try:
        yield
    finally:
        _thread.override = previous


def current_override() -> dict[str, dict] | None:
    """This thread's active override ({kernel: config}), or None."""
    return _thread.override


def count_benchmark(n: int = 1):
    """Called by the search (tuning.search) once per candidate it times, wherever it runs."""
    with _lock:
        _stats["autotune_benchmarks"] += n


def stats() -> dict:
    """Counters since start (or `reset`): autotune_benchmarks (candidate timings by the search),
    autotune_runs (shapes tuned at run time), files_read (tuned/user-cache files parsed)."""
    with _lock:
        return dict(_stats)


def last_launches() -> dict[str, dict]:
    """Per kernel, this thread's most recent launch of it, in first-launch order: {"config", "source",
    "entry"}; source is one of override / tuned / user-cache / autotuned / nearest / default, entry the
    key of the entry used (or None). Covers every kernel, the recurrent and decode ones included."""
    return {k: {**v, "config": dict(v["config"])} for k, v in _thread.launches.items()}


def record_launch(kernel: str, cfg: dict, source: str, entry):
    _thread.launches[kernel] = {"config": dict(cfg), "source": source, "entry": entry}


def launch_scope() -> tuple:
    """This thread's (override, launch records): what its launches see and where they are recorded.
    An autograd Function takes it in its forward and enters it around its backward
    (`in_launch_scope`), since PyTorch runs a CUDA backward on its own worker thread: the backward's
    kernels then launch with the override of the thread that ran the forward, and are recorded there."""
    return _thread.override, _thread.launches


@contextlib.contextmanager
def in_launch_scope(scope: tuple):
    previous = _thread.override, _thread.launches
    _thread.override, _thread.launches = scope
    try:
        yield
    finally:
        _thread.override, _thread.launches = previous


def clear_launches():
    """Forget this thread's launch records (the sweep uses it to see which kernels an op launches)."""
    _thread.launches.clear()


# ---------------------------------------------------------------------------------------------
# files: locate, parse, validate
# ---------------------------------------------------------------------------------------------

@dataclass
class Entry:
    key: tuple
    configs: dict
    backend: str
    index: int


@dataclass
class Table:
    path: Path
    meta: dict
    entries: list = field(default_factory=list)
    exact: dict = field(default_factory=dict)


class FileProblem(Exception):
    """Why a tuned file cannot be used; the message goes into the one warning."""


def tuned_file_path() -> Path | None:
    """The tuned file this process reads: $GSA_TUNED_CONFIGS, else tuned_configs/<arch>.yaml."""
    env = os.environ.get(ENV_FILE)
    if env is not None:
        return None if env.strip().lower() in ("", "none", "off") else Path(env).expanduser()
    arch = current_arch()
    return None if arch is None else tuned_configs_dir() / f"{arch}.yaml"


def user_cache_path(arch: str | None = None) -> Path:
    base = os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "gsa_kernels")
    return Path(base) / f"{arch or current_arch() or 'interpreter'}.yaml"


def expected_meta() -> dict:
    """What a file must say about the software to be used here."""
    from gsa_kernels.configs import CANDIDATES
    return {"format": FORMAT, "triton": triton.__version__, "kernel_hashes": dict(kernel_hashes()),
            "candidates": {k: candidates_hash(k) for k in CANDIDATES}}


def _require(cond, msg):
    if not cond:
        raise FileProblem(f"malformed: {msg}")


def _int(x) -> bool:
    """An int that is not a bool (True == 1 would pass a membership test of [0, 1])."""
    return isinstance(x, int) and not isinstance(x, bool)


def _positive_int(x) -> bool:
    return _int(x) and 0 < x <= MAX_KEY_VALUE


def _string(x) -> bool:
    return isinstance(x, str)


def parse_key(key, where: str) -> tuple:
    """A file's `key` mapping as a problem key, or FileProblem naming what breaks it (`where`: the
    item it belongs to)."""
    _require(isinstance(key, dict) and set(KEY_FIELDS) <= set(key), f"{where}.key must have {KEY_FIELDS}")
    for name in ("K", "V", "M", "tokens", "seqs"):
        _require(_positive_int(key[name]),
                 f"{where}.key.{name} must be a positive int (at most 2^40), got {str(key[name])[:40]!r}")
    _require(_string(key["dtype"]) and key["dtype"] in DTYPES,
             f"{where}.key.dtype must be one of {sorted(DTYPES)}")
    return problem_key(K=key["K"], V=key["V"], M=key["M"], dtype=key["dtype"],
                       tokens=key["tokens"], seqs=key["seqs"])


def parse_entry(raw, index: int) -> Entry:
    """One entry of `entries`, checked against the present CANDIDATES (params and values)."""
    from gsa_kernels.configs import CANDIDATES
    where = f"entries[{index}]"
    _require(isinstance(raw, dict), f"{where} is not a mapping")
    k = parse_key(raw.get("key"), where)
    backend = raw.get("backend", "triton")
    _require(_string(backend) and backend in BACKENDS, f"{where}.backend must be one of {BACKENDS}")
    configs = raw.get("configs")
    _require(isinstance(configs, dict) and set(configs) == set(CANDIDATES),
             f"{where}.configs must name exactly the kernels {sorted(CANDIDATES)}")
    for kernel, cfg in configs.items():
        _require(isinstance(cfg, dict) and set(cfg) == set(CANDIDATES[kernel]),
                 f"{where}.configs.{kernel} must set {sorted(CANDIDATES[kernel])}")
        for param, value in cfg.items():
            _require(_int(value) and value in CANDIDATES[kernel][param],
                     f"{where}.configs.{kernel}.{param} = {str(value)[:40]!r} is not a candidate "
                     f"{CANDIDATES[kernel][param]}")
    return Entry(k, {kn: dict(c) for kn, c in configs.items()}, backend, index)


def _hash_map(meta, name) -> dict:
    """meta[name] as {kernel: hash string}; anything else is malformed."""
    value = meta.get(name)
    _require(isinstance(value, dict) and all(_string(k) and _string(v) for k, v in value.items()),
             f"meta.{name} must map kernel names to hash strings")
    return value


def validate(doc, *, arch: str | None) -> tuple[dict, list, tuple]:
    """(meta, entries, stale kernels) of a parsed YAML document, or FileProblem saying why it cannot be
    used at all. The stale kernels' configs are dropped from the entries (their launches take the
    nearest fresh entry's config or the default); every other kernel keeps its tuned configs."""
    from gsa_kernels.configs import CANDIDATES
    _require(isinstance(doc, dict), "the top level is not a mapping")
    meta, raw_entries = doc.get("meta"), doc.get("entries")
    _require(isinstance(meta, dict), "no `meta` mapping")
    _require(isinstance(raw_entries, list), "no `entries` list")
    _require(_int(meta.get("format")) and meta.get("format") == FORMAT,
             f"meta.format must be {FORMAT}, got {str(meta.get('format'))[:40]!r} (re-run the sweep)")
    for name in ("arch", "triton"):
        _require(_string(meta.get(name)), f"meta.{name} must be a string")
    file_hashes, file_candidates = _hash_map(meta, "kernel_hashes"), _hash_map(meta, "candidates")
    if arch is not None and meta["arch"] != arch:
        raise FileProblem(f"tuned for {meta['arch']}, but this GPU is {arch}")
    if arch is not None and meta.get("dry_run"):
        raise FileProblem("written by a --dry-run in Triton's interpreter; its times mean nothing on a GPU")
    want = expected_meta()
    if meta["triton"] != want["triton"]:
        raise FileProblem(f"stale: made for Triton {meta['triton']} (this is {want['triton']}); re-run the sweep")
    entries = [parse_entry(raw, i) for i, raw in enumerate(raw_entries)]
    stale = tuple(k for k in CANDIDATES if file_hashes.get(k) != want["kernel_hashes"][k]
                  or file_candidates.get(k) != want["candidates"][k])
    if len(stale) == len(CANDIDATES):
        raise FileProblem("stale: made for other sources or candidate lists of every kernel; re-run the sweep")
    for entry in entries:
        for kernel in stale:
            entry.configs.pop(kernel)
    return meta, entries, stale


def _load_yaml(text: str):
    import yaml
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def read_table(path: Path, *, arch: str | None, missing_ok: bool) -> Table | None:
    """Parse and validate one file; None (after one warning, unless merely absent) if unusable. No
    content of the file can make this raise: a tuned file is a cache, and a broken cache must never
    stop a model from running."""
    try:
        if not path.is_file():
            if not missing_ok:
                _file_warning(path, f"{ENV_FILE}={path} does not exist")
            return None
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            _file_warning(path, f"malformed: {size} bytes, over the {MAX_FILE_BYTES}-byte limit of a tuned file")
            return None
        with _lock:
            _stats["files_read"] += 1
        meta, entries, stale = validate(_load_yaml(path.read_text()), arch=arch)
    except FileProblem as e:
        _file_warning(path, str(e))
        return None
    except (Exception, RecursionError) as e:     # yaml errors, decoding, OSError, anything nested too deep
        _file_warning(path, f"malformed: not readable YAML ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
        return None
    if stale:
        _file_warning(path, f"stale for kernels {list(stale)} (made for another source of them, or other "
                         f"candidate lists): those launch with defaults; re-run the sweep with "
                         f"--kernels {','.join(stale)}", whole=False)
    table = Table(path, meta, entries)
    for entry in entries:
        table.exact.setdefault(entry.key, entry)
    return table


_warned: set = set()


def _warn_once(tag: str, message: str):
    """One RuntimeWarning per tag (a file, a failed write) until `reset`."""
    with _lock:
        if tag in _warned:
            return
        _warned.add(tag)
    warnings.warn(f"gsa_kernels: {message}", RuntimeWarning, stacklevel=4)


def _file_warning(path, why, whole=True):
    what = "ignoring tuned configs" if whole else "using part of tuned configs"
    _warn_once(str(path), f"{what} {path}: {why}. Falling back to the nearest usable entry or the "
                          f"default configs (correct, maybe slower).")


# ---------------------------------------------------------------------------------------------
# lookup
# ---------------------------------------------------------------------------------------------

_tables: dict | None = None            # {"tuned": Table|None, "cache": Table|None}, read once
_selected: dict = {}                   # problem key -> (Entry | None, source)


def _load_tables() -> dict:
    global _tables
    with _lock:
        if _tables is None:
            arch = current_arch()
            path = tuned_file_path()
            explicit = os.environ.get(ENV_FILE) is not None
            _tables = {
                "tuned": None if path is None else read_table(path, arch=arch, missing_ok=not explicit),
                "cache": read_table(user_cache_path(arch), arch=arch, missing_ok=True),
            }
        return _tables


def reset():
    """Forget the files read, the selections, the warnings given, the counters and last launches."""
    global _tables
    with _lock:
        _tables = None
        _selected.clear()
        _warned.clear()
        _thread.launches.clear()
        _autotune_failed.clear()
        _unsaved.clear()
        for k in _stats:
            _stats[k] = 0


def _distance(a: tuple, b: tuple) -> float:
    K, V, M, dt, tokens, seqs = a
    K2, V2, M2, dt2, tokens2, seqs2 = b
    half = {"float16", "bfloat16"}
    d_dtype = 0 if dt == dt2 else (1 if {dt, dt2} <= half else 4)
    d = abs(math.log2(K / K2)) + abs(math.log2(V / V2)) + 2 * abs(math.log2(M / M2)) + d_dtype
    if tokens is not None:
        d += 0.5 * abs(math.log2(tokens / tokens2))
    if seqs is not None:
        d += 0.5 * abs(math.log2(seqs / seqs2))
    return d


def _entry_fits(entry: Entry, key: tuple) -> bool:
    K, V, M, dt = key[:4]
    BT = entry.configs.get("chunk", {}).get("BT", 64)
    return all(fits(cfg, K=K, V=V, M=M, BT=BT, dtype=dt) for cfg in entry.configs.values())


def select_entry(key: tuple) -> tuple[Entry | None, str]:
    """(entry, source) for a problem key: exact tuned, exact user-cache, nearest that fits, or
    (None, "default")."""
    with _lock:
        if key in _selected:
            return _selected[key]
        tables = _load_tables()
        found = None
        exact_possible = key[4] is not None and key[5] is not None
        for name, source in (("tuned", "tuned"), ("cache", "user-cache")):
            table = tables[name]
            if exact_possible and table is not None and key in table.exact:
                found = (table.exact[key], source)
                break
        if found is None and key in _unsaved:
            found = (_unsaved[key], "autotuned")
        if found is None:
            candidates = [e for name in ("tuned", "cache") if tables[name] is not None
                          for e in tables[name].entries] + list(_unsaved.values())
            ranked = sorted(enumerate(candidates), key=lambda ie: (_distance(key, ie[1].key), ie[0]))
            found = next(((e, "nearest") for _, e in ranked if _entry_fits(e, key)), (None, "default"))
        _selected[key] = found
        return found


def lookup(kernel: str, *, K, V, M, dtype, tokens=None, seqs=None) -> tuple[dict | None, str, tuple | None]:
    """(config or None, source, entry key) for one launch; None means "use the default config"."""
    forced = _thread.override
    if forced is not None and kernel in forced:
        return dict(forced[kernel]), "override", None
    key = problem_key(K=K, V=V, M=M, dtype=dtype, tokens=tokens, seqs=seqs)
    entry, source = select_entry(key)
    if entry is None or kernel not in entry.configs:        # no entry, or this kernel's configs are stale
        return None, "default", None
    return dict(entry.configs[kernel]), source, entry.key


def has_exact(key: tuple) -> bool:
    return select_entry(key)[1] in ("tuned", "user-cache", "autotuned")


def backend_for(key: tuple) -> str:
    """"torch_compile" only for an exact entry that says so, from a file of this torch major.minor."""
    if _thread.override is not None:
        return "triton"
    entry, source = select_entry(key)
    if entry is None or source not in ("tuned", "user-cache") or entry.backend != "torch_compile":
        return "triton"       # an autotuned entry the cache could not keep has no torch version: Triton
    table = _load_tables()["tuned" if source == "tuned" else "cache"]
    file_torch = str(table.meta.get("torch", ""))
    if file_torch.split(".")[:2] != torch.__version__.split(".")[:2]:
        return "triton"
    return "torch_compile"


# torch.compile mode of the competing backend. Not "max-autotune": that mode adds CUDA graphs, whose
# outputs are overwritten by the next call, a contract a drop-in op cannot impose on its callers; the
# sweep times exactly what is dispatched.
COMPILE_MODE = "max-autotune-no-cudagraphs"
_compiled = None


def compiled_reference():
    """reference.chunk_gsa_torch under torch.compile, built once per process."""
    global _compiled
    with _lock:
        if _compiled is None:
            from reference.chunked import chunk_gsa_torch
            _compiled = torch.compile(chunk_gsa_torch, mode=COMPILE_MODE)
        return _compiled


# ---------------------------------------------------------------------------------------------
# opt-in autotuning at run time
# ---------------------------------------------------------------------------------------------

_autotune_failed: set = set()
# entries tuned in this process that the user cache could not store (unwritable location): kept here,
# so that the process uses what it measured and does not tune the same key again
_unsaved: dict = {}


def autotune_enabled() -> bool:
    return os.environ.get(ENV_AUTOTUNE, "0").strip().lower() in ("1", "true", "yes", "on")


def maybe_autotune(*, B, T, H, K, V, M, N, dtype, device) -> bool:
    """With GSA_KERNELS_AUTOTUNE=1 and no exact entry for this problem: tune it now, persist the
    winner to the user cache and use it. Returns whether it tuned. Never inside an override."""
    if not autotune_enabled() or _thread.override is not None:
        return False
    key = problem_key(K=K, V=V, M=M, dtype=dtype, tokens=B * T * H, seqs=N * H)
    if key in _autotune_failed or has_exact(key):
        return False
    from tuning import search, yamlio  # the search lives with the sweep; imported only when opted in
    # a packed (varlen) batch is tuned as the dense [B, T, H] it packs, and stored under its own key
    result = search.tune_shape(B=B, T=T, H=H, K=K, V=V, M=M, dtype=dtype, device=device)
    with _lock:
        _stats["autotune_runs"] += 1
    entry = result.get("entry")
    if entry is None:
        with _lock:
            _autotune_failed.add(key)      # tried once per process; the defaults serve meanwhile
        warnings.warn(f"gsa_kernels: autotuning {key} failed ({result.get('failed')}); using the "
                      f"nearest tuned entry or the defaults", RuntimeWarning, stacklevel=3)
    else:
        entry["key"].update(tokens=key[4], seqs=key[5])
        arch = current_arch()
        path = user_cache_path(arch)
        try:
            yamlio.merge_entry(path, entry, meta=search.run_meta(
                arch=arch or "interpreter", dry_run=arch is None, device=device))
        except Exception as e:        # a file where the folder should be, read-only, a folder as the file
            with _lock:
                _unsaved[key] = parse_entry(entry, 0)
            _warn_once(f"{path} (write)", f"could not save an autotuned entry to the user cache {path} "
                       f"({type(e).__name__}: {e}); it is used for this process only. Set {ENV_CACHE_DIR} "
                       f"to a writable folder to keep it")
    global _tables
    with _lock:
        _tables = None        # re-read: the cache has the new entry
        _selected.clear()
    return True
