"""The tuned file on disk: atomic writes, reading for --resume, merging one entry (the user cache).

Schema (format 2), written by the sweep and by the opt-in autotuner, read by gsa_kernels/tuned_file.py:

    meta:     format, arch, gpu, sm_count, device, triton, torch, date, dry_run, complete,
              kernel_hashes {kernel: hash}, candidates {kernel: hash}, search {settings of the run}
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
import re
import tempfile
from pathlib import Path

import yaml

ENTRY_ORDER = ("dtype", "K", "V", "M", "tokens", "seqs")
# meta fields two files must share for their entries to be comparable (beyond the kernels' sources)
SAME_RUN = ("format", "arch", "gpu", "dry_run", "triton", "torch")


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
    """The chunk entries first, then the recurrent ones; each by key."""
    return sorted(entries, key=lambda e: (e.get("op", "chunk") != "chunk", *(e["key"][k] for k in ENTRY_ORDER)))


def software_mismatch(old_meta: dict, new_meta: dict, used: set | None = None) -> list[str]:
    """What differs between two runs' meta that makes their entries incomparable. A kernel the old
    run did not know (added to the package since) is no difference: the old entries hold no config of it.
    With `used` (the kernels the old entries configure) a kernel outside it is no difference either: an
    edit of the decode step does not touch a file of chunk entries."""
    out = [f"{f}: {old_meta.get(f)!r} vs {new_meta.get(f)!r}" for f in SAME_RUN
           if old_meta.get(f) != new_meta.get(f)]
    for f in ("kernel_hashes", "candidates"):
        old, new = old_meta.get(f), new_meta.get(f)
        if not isinstance(old, dict) or not isinstance(new, dict):
            out.append(f"{f}: {old!r} vs {new!r}")
            continue
        changed = sorted(k for k, v in old.items() if (used is None or k in used) and new.get(k) != v)
        if changed:
            out.append(f"{f} of {', '.join(changed)}")
    return out


def configured_kernels(entries: list) -> set:
    """The kernels that a file's entries set configs for."""
    return {k for e in entries if isinstance(e, dict) and isinstance(e.get("configs"), dict) for k in e["configs"]}


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


def stale_temp_files(path) -> list[Path]:
    """The temp files that killed atomic_write_yaml(path) calls left next to path: exactly the names
    its mkstemp gives, `.<name>.` + 8 of [a-z0-9_] + `.tmp`, and only regular files, so nothing of
    another output or of the user's can match."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    try:
        names = sorted(os.listdir(path.parent))
    except OSError:         # no folder yet: nothing left over
        return []
    found = []
    for name in names:
        candidate = path.parent / name
        if pattern.fullmatch(name) and candidate.is_file() and not candidate.is_symlink():
            found.append(candidate)
    return found


def remove_stale_temp_files(path) -> list[Path]:
    """Remove stale_temp_files(path); returns those removed. One that cannot be removed is left: it
    costs disk space, never correctness (no reader looks at these names)."""
    removed = []
    for tmp in stale_temp_files(path):
        try:
            tmp.unlink()
        except OSError:
            continue
        removed.append(tmp)
    return removed


def unwritable_reason(path) -> str | None:
    """Why atomic_write_yaml(path) would fail, or None. Checked by creating (and removing) a file where
    the write would, since permission bits do not tell (root ignores them; read-only mounts and
    pseudo file systems refuse anyway)."""
    path = Path(path)
    if path.is_dir():
        return "is a directory; expected the path of a file"
    folder = path.parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent       # atomic_write_yaml creates the missing folders below this one
    if not folder.is_dir():
        return f"{folder} is not a directory; expected a folder to write the file in"
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        return f"cannot create a file in {folder} ({e.strerror or e}); expected a writable folder"
    os.close(fd)
    os.unlink(probe)
    return None


def _kind(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]


def resume_parts(doc) -> tuple[dict, list, list]:
    """(meta, entries, failed) of a tuned file read for --resume, or ValueError naming the part that
    breaks the schema. Only the outline: the entries are checked by check_resume_items once the file
    is known to come from the same software (whose candidate lists they are checked against)."""
    if not isinstance(doc, dict):
        raise ValueError(f"the top level must be a mapping, got {_kind(doc)}")
    meta, entries, failed = doc.get("meta"), doc.get("entries"), doc.get("failed")
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a mapping, got {_kind(meta)}")
    if not isinstance(entries, list):
        raise ValueError(f"entries must be a list, got {_kind(entries)}")
    if failed is None:       # absent, or `failed:` with nothing after it: no failed shapes
        failed = []
    if not isinstance(failed, list):
        # list() of a string would be its letters, and the sweep would write them back
        raise ValueError(f"failed must be a list, got {_kind(failed)}")
    return meta, list(entries), list(failed)


def check_resume_items(entries: list, failed: list):
    """ValueError naming the first entry or failed shape that the sweep could not keep: entries as the
    run-time loader reads them (gsa_kernels.tuned_file.parse_entry), failed shapes as mappings whose key,
    where present, is a problem key (the sweep skips shapes by it)."""
    from gsa_kernels import tuned_file

    for i, entry in enumerate(entries):
        try:
            tuned_file.parse_entry(entry, i)
        except tuned_file.FileProblem as e:
            raise ValueError(str(e).removeprefix("malformed: ")) from None
        except (TypeError, ValueError, KeyError) as e:     # a shape the loader's checks did not foresee
            raise ValueError(f"entries[{i}] cannot be read ({type(e).__name__}: {e})") from None
    for i, item in enumerate(failed):
        where = f"failed[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be a mapping, got {_kind(item)}")
        if "key" in item:
            try:
                tuned_file.parse_key(item["key"], where)
            except tuned_file.FileProblem as e:
                raise ValueError(str(e).removeprefix("malformed: ")) from None
