"""The tuned files on disk: where they are, reading and validating them, and the warnings when one
cannot be used.

Up to three files are read, once per process (until `reset`): the shipped files for the present GPU
(gsa_kernels._paths), `tuned_configs/<arch>-<model>.yaml` with entries measured on this GPU model
(`problem_keys.current_device_model`, e.g. sm90-nvidia-h200.yaml) and `tuned_configs/<arch>.yaml`
with entries of any GPU of the arch, both optional; or instead of both, `$GSA_KERNELS_TUNED_CONFIGS`
when set (the words `none`/`off` or an empty value: no file); and the user cache,
`$GSA_KERNELS_CACHE_DIR/<arch>.yaml` (default `~/.cache/gsa_kernels`), which holds the entries the
opt-in autotuner measured on this machine. A device file must say it was measured on that model.
The variable's former name, GSA_TUNED_CONFIGS, is still read (GSA_KERNELS_TUNED_CONFIGS wins when both
are set), with one FutureWarning per process (a DeprecationWarning would be hidden from users
by default: the name is set by the user, not by code).

A file is used only when it is well-formed (`validate`: any break of the schema, anywhere, and a
file over MAX_FILE_BYTES count as malformed), made for this arch (when a GPU is present) and by this
Triton version. Staleness is per kernel: a kernel's configs are used only when the file was measured
on the same source of that kernel and the helpers it calls (`kernel_hashes`) and with the same
candidate list (`candidates_hash`); the other kernels of the same entries stay in use. Anything
unusable gives one `warnings.warn` per file and the fallback (user cache, nearest, default): never an
exception at launch and never a silently used stale config.
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import triton

from gsa_kernels import candidates
from gsa_kernels._paths import tuned_configs_dir
from gsa_kernels.kernel_hashes import kernel_hashes
from gsa_kernels.launches import count
from gsa_kernels.problem_keys import DTYPES, KEY_FIELDS, current_arch, current_device_model, device_slug, problem_key

FORMAT = 2             # 2: per-kernel source hashes (meta.kernel_hashes) instead of one for all files
# A tuned file holds some kilobytes per entry; past this it is not a file the sweep wrote, and parsing
# it would hold the lookup lock for minutes
MAX_FILE_BYTES = 4 << 20
# Largest dim or work size a key may name (2^40 token-heads); beyond it, log-space distances overflow
MAX_KEY_VALUE = 1 << 40
ENV_FILE = "GSA_KERNELS_TUNED_CONFIGS"
ENV_FILE_DEPRECATED = "GSA_TUNED_CONFIGS"     # ENV_FILE's former name, without the package prefix
ENV_CACHE_DIR = "GSA_KERNELS_CACHE_DIR"
BACKENDS = ("triton", "torch_compile")
# torch.compile modes a sweep may time the torch_compile backend with (an entry's `compile_mode`)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")

_lock = threading.RLock()
_tables: dict | None = None            # {"device", "tuned", "cache": Table|None}, read once
_warned: set = set()                   # tags of the warnings given (`warn_once`)


@dataclass
class Entry:
    key: tuple
    configs: dict
    backend: str
    index: int
    op: str = "chunk"             # candidates.OPS: the op whose launches the entry configures
    compile_mode: str | None = None   # the mode its torch_compile backend was timed with; None: unnamed
    triton: str | None = None     # the Triton version of a file made with another one than this process's


@dataclass
class Table:
    path: Path
    meta: dict
    entries: list = field(default_factory=list)
    exact: dict = field(default_factory=dict)     # (op, problem key) -> the first entry of that key


class FileProblem(Exception):
    """Why a tuned file cannot be used; the message goes into the one warning."""


# ---------------------------------------------------------------------------------------------
# where the files are
# ---------------------------------------------------------------------------------------------

def _env_setting() -> tuple[str, str] | None:
    """(variable, value) that names the tuned file, or None when neither name is set."""
    value, old = os.environ.get(ENV_FILE), os.environ.get(ENV_FILE_DEPRECATED)
    if old is not None:
        ignored = f"; it is ignored, as {ENV_FILE} is set" if value is not None else ""
        warn_once(f"env {ENV_FILE_DEPRECATED}", f"{ENV_FILE_DEPRECATED} is deprecated: set {ENV_FILE} "
                  f"instead{ignored}", FutureWarning)
    if value is not None:
        return ENV_FILE, value
    return None if old is None else (ENV_FILE_DEPRECATED, old)


def tuned_file_path() -> Path | None:
    """The arch-wide tuned file this process reads (module docstring); None: no file."""
    return _tuned_file_paths(_env_setting())["tuned"]


def device_file_path() -> Path | None:
    """The tuned file of this GPU model this process reads (module docstring); None: no file."""
    return _tuned_file_paths(_env_setting())["device"]


def device_file_name(arch: str, model: str) -> str:
    """`<arch>-<model>.yaml`: the name of a tuned file measured on one GPU model."""
    return f"{arch}-{model}.yaml"


def _tuned_file_paths(setting: tuple[str, str] | None) -> dict:
    """{"device": path or None, "tuned": path or None}: the files to read for this process."""
    if setting is not None:
        value = setting[1]
        named = None if value.strip().lower() in ("", "none", "off") else Path(value).expanduser()
        return {"device": None, "tuned": named}
    arch, model = current_arch(), current_device_model()
    return {"device": None if arch is None or model is None else tuned_configs_dir() / device_file_name(arch, model),
            "tuned": None if arch is None else tuned_configs_dir() / f"{arch}.yaml"}


def user_cache_path(arch: str | None = None) -> Path:
    base = os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "gsa_kernels")
    return Path(base) / f"{arch or current_arch() or 'interpreter'}.yaml"


# ---------------------------------------------------------------------------------------------
# the schema
# ---------------------------------------------------------------------------------------------

def expected_meta() -> dict:
    """What a file must say about the software to be used here."""
    return {"format": FORMAT, "triton": triton.__version__, "kernel_hashes": dict(kernel_hashes()),
            "candidates": {k: candidates.candidates_hash(k) for k in candidates.all_candidates()}}


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


def parse_entry(raw, index: int, stale=()) -> Entry:
    """One entry of `entries`, checked against the present candidates of its op (params and values);
    the configs of `stale` kernels were made for other candidate lists or sources, so only their
    presence is checked (the caller drops them). A chunk entry names every chunk kernel (one call
    launches them all); a recurrent entry names the recurrent kernels its shape launched (the decode
    step at T = 1 only), at least one."""
    where = f"entries[{index}]"
    _require(isinstance(raw, dict), f"{where} is not a mapping")
    op = raw.get("op", "chunk")
    _require(_string(op) and op in candidates.OPS, f"{where}.op must be one of {candidates.OPS}")
    known = candidates.op_candidates(op)
    k = parse_key(raw.get("key"), where)
    backend = raw.get("backend", "triton")
    _require(_string(backend) and backend in BACKENDS, f"{where}.backend must be one of {BACKENDS}")
    _require(op == "chunk" or backend == "triton", f"{where}.backend must be triton for op {op}")
    compile_mode = raw.get("compile_mode")
    _require(compile_mode is None or (_string(compile_mode) and compile_mode in COMPILE_MODES),
             f"{where}.compile_mode must be one of {COMPILE_MODES}")
    configs = raw.get("configs")
    if op == "chunk":
        _require(isinstance(configs, dict) and set(configs) == set(known),
                 f"{where}.configs must name exactly the kernels {sorted(known)}")
    else:
        _require(isinstance(configs, dict) and configs and set(configs) <= set(known),
                 f"{where}.configs must name some of the kernels {sorted(known)}")
    for kernel, cfg in configs.items():
        _require(isinstance(cfg, dict), f"{where}.configs.{kernel} is not a mapping")
        if kernel in stale:
            continue
        _require(set(cfg) == set(known[kernel]),
                 f"{where}.configs.{kernel} must set {sorted(known[kernel])}")
        for param, value in cfg.items():
            _require(_int(value) and value in known[kernel][param],
                     f"{where}.configs.{kernel}.{param} = {str(value)[:40]!r} is not a candidate "
                     f"{known[kernel][param]}")
    return Entry(k, {kn: dict(c) for kn, c in configs.items()}, backend, index, op, compile_mode)


def _hash_map(meta, name) -> dict:
    """meta[name] as {kernel: hash string}; anything else is malformed."""
    value = meta.get(name)
    _require(isinstance(value, dict) and all(_string(k) and _string(v) for k, v in value.items()),
             f"meta.{name} must map kernel names to hash strings")
    return value


def validate(doc, *, arch: str | None, model: str | None = None) -> tuple[dict, list, tuple]:
    """(meta, entries, stale kernels) of a parsed YAML document, or FileProblem saying why it cannot be
    used at all. The stale kernels' configs are dropped from the entries (their launches take the
    nearest fresh entry's config or the default); every other kernel keeps its tuned configs.
    model: the GPU model a device file must have been measured on (`device_slug` of meta.gpu)."""
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
    if model is not None and device_slug(str(meta.get("gpu", ""))) != model:
        raise FileProblem(f"measured on {str(meta.get('gpu'))[:60]!r}, but this GPU is {model}: a device "
                          f"file must come from that model")
    if arch is not None and meta.get("dry_run"):
        raise FileProblem("written by a --dry-run in Triton's interpreter; its times mean nothing on a GPU")
    want = expected_meta()
    # the kernels this file tunes: those of the ops its entries configure (a file of chunk entries
    # says nothing about the recurrent kernels, so their sources may change freely)
    ops = {raw.get("op", "chunk") for raw in raw_entries
           if isinstance(raw, dict) and raw.get("op", "chunk") in candidates.OPS} or {"chunk"}
    known = [k for op in candidates.OPS if op in ops for k in candidates.op_candidates(op)]
    stale = tuple(k for k in known if file_hashes.get(k) != want["kernel_hashes"][k]
                  or file_candidates.get(k) != want["candidates"][k])
    if len(stale) == len(known):
        raise FileProblem("stale: made for other sources or candidate lists of every kernel; re-run the sweep")
    entries = [parse_entry(raw, i, stale) for i, raw in enumerate(raw_entries)]
    # another Triton version compiles the same source to other code: its configs still run and are
    # likely good (a known miscompile of this version is fenced at launch, configs.launch_config),
    # so they are kept and each launch says which version they were timed with
    other_triton = None if meta["triton"] == want["triton"] else str(meta["triton"])
    for entry in entries:
        entry.triton = other_triton
        for kernel in stale:
            entry.configs.pop(kernel, None)
    return meta, entries, stale


# ---------------------------------------------------------------------------------------------
# reading, once per process
# ---------------------------------------------------------------------------------------------

def _load_yaml(text: str):
    import yaml  # on the first file read only: a process without a tuned file never loads it
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def read_table(path: Path, *, arch: str | None, missing: str | None, model: str | None = None) -> Table | None:
    """Parse and validate one file; None (after one warning, unless merely absent) if unusable.
    `missing`: what to say when the file does not exist (None: nothing, it is optional); `model`: the
    GPU model of a device file (`validate`). No content
    of the file can make this raise: a tuned file is a cache, and a broken cache must never stop a
    model from running."""
    try:
        if not path.is_file():
            if missing is not None:
                _file_warning(path, missing)
            return None
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            _file_warning(path, f"malformed: {size} bytes, over the {MAX_FILE_BYTES}-byte limit of a tuned file")
            return None
        count("files_read")
        meta, entries, stale = validate(_load_yaml(path.read_text()), arch=arch, model=model)
    except FileProblem as e:
        _file_warning(path, str(e))
        return None
    except (Exception, RecursionError) as e:     # yaml errors, decoding, OSError, anything nested too deep
        _file_warning(path, f"malformed: not readable YAML ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
        return None
    notes = []
    if str(meta["triton"]) != triton.__version__:
        notes.append(f"made with Triton {meta['triton']} (this is {triton.__version__}): its configs are used "
                     f"(last_launches() names the version), timed with the other compiler; re-run the sweep "
                     f"to time them with this one")
    if stale:
        notes.append(f"stale for kernels {list(stale)} (made for another source of them, or other "
                     f"candidate lists): those launch with defaults; re-run the sweep with "
                     f"--kernels {','.join(stale)}")
    if notes:
        _file_warning(path, "; ".join(notes), whole=False)
    table = Table(path, meta, entries)
    for entry in entries:
        table.exact.setdefault((entry.op, entry.key), entry)
    return table


def load_tables() -> dict:
    """{"device", "tuned", "cache": Table or None}, read on the first call after a `reread`."""
    global _tables
    with _lock:
        if _tables is None:
            arch = current_arch()
            setting = _env_setting()
            paths = _tuned_file_paths(setting)
            # a file the user named must exist; the shipped ones may be missing (a GPU not tuned)
            missing = None if setting is None else f"{setting[0]}={paths['tuned']} does not exist"
            device = paths["device"]
            _tables = {
                "device": None if device is None else read_table(device, arch=arch, missing=None,
                                                                 model=current_device_model()),
                "tuned": None if paths["tuned"] is None else read_table(paths["tuned"], arch=arch, missing=missing),
                "cache": read_table(user_cache_path(arch), arch=arch, missing=None),
            }
        return _tables


def reread():
    """Read the files again at the next lookup (the user cache has a new entry)."""
    global _tables
    with _lock:
        _tables = None


def reset():
    """Forget the files read and the warnings given."""
    with _lock:
        reread()
        _warned.clear()


def warn_once(tag: str, message: str, category=RuntimeWarning):
    """One warning per tag (a file, a failed write) until `reset`."""
    with _lock:
        if tag in _warned:
            return
        _warned.add(tag)
    warnings.warn(f"gsa_kernels: {message}", category, stacklevel=4)


def _file_warning(path, why, whole=True):
    what = "ignoring tuned configs" if whole else "using part of tuned configs"
    warn_once(str(path), f"{what} {path}: {why}. Falling back to the nearest usable entry or the "
                         f"default configs (correct, maybe slower).")
