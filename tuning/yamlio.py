"""The tuned file on disk: atomic writes, reading for --resume, merging one entry (the user cache).

Schema (format 1), written by the sweep and by the opt-in autotuner, read by gsa_kernels/tuned.py:

    meta:     format, arch, gpu, sm_count, device, triton, torch, date, dry_run, complete,
              source_hash, source_files, candidates {kernel: hash}, search {settings of the run}
    entries:  - key:      {K, V, M, dtype, tokens, seqs}       (tokens = B*T*H, seqs = N*H, bucketed)
                shape:    [B, T, H, K, V, M]                  (the shape measured)
                backend:  triton | torch_compile
                configs:  {kernel: {param: value}}            (every kernel of CANDIDATES)
                times_ms: {kernel: {winner, runner_up, op}, triton_fwd, triton_fwd_bwd,
                           torch_compile_fwd, torch_compile_fwd_bwd}
                candidates: {kernel: {timed, pruned, rejected}}
                rejected: {kernel: [reason, ...]}            (only when some were rejected)
                notes:    [...]
    failed:   - {shape, dtype, reason}                      (shapes no candidate passed; not retried on --resume)
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

ENTRY_ORDER = ("dtype", "K", "V", "M", "tokens", "seqs")


def dump(doc) -> str:
    # innermost mappings/lists in flow style: one config per line, readable and diffable
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)


def atomic_write_yaml(path, doc):
    """Write doc to path so that a crash leaves either the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dump(doc)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def sort_entries(entries: list) -> list:
    return sorted(entries, key=lambda e: tuple(e["key"][k] for k in ENTRY_ORDER))


def software_mismatch(old_meta: dict, new_meta: dict) -> list[str]:
    """What differs between two runs' meta that makes their entries incomparable."""
    fields = ("format", "arch", "gpu", "dry_run", "triton", "torch", "source_hash", "candidates")
    return [f"{f}: {old_meta.get(f)!r} vs {new_meta.get(f)!r}" for f in fields
            if old_meta.get(f) != new_meta.get(f)]


def merge_entry(path, entry: dict, *, meta: dict):
    """Add (or replace, same key) one entry in the file at path; a file from other software, or an
    unreadable one, is replaced. Used for the user cache, where two processes may race: each
    re-reads just before its atomic write, so the worst case is one lost entry, tuned again later."""
    path = Path(path)
    entries = []
    try:
        old = read_yaml(path) if path.is_file() else None
        if isinstance(old, dict) and isinstance(old.get("meta"), dict) and isinstance(old.get("entries"), list) \
                and not software_mismatch(old["meta"], meta):
            entries = [e for e in old["entries"] if isinstance(e, dict) and e.get("key") != entry["key"]]
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        entries = []
    atomic_write_yaml(path, {"meta": {**meta, "complete": True}, "entries": sort_entries(entries + [entry]),
                             "failed": []})
