"""Put a sweep's new entries into a shipped tuned file: the entries of NEW replace those of BASE with
the same op and key, and BASE's other entries stay.

    python -m tuning.combine BASE NEW [--output PATH] [--note TEXT]      (default: BASE, rewritten atomically)

For a kernel edit that leaves the other kernels alone: the sweep re-tunes the edited kernels' op
(`--seed BASE --kernels ... --op ...`) into NEW, and this puts NEW into BASE, keeping BASE's entries
of the ops the edit did not touch. `--resume` cannot do it: it refuses a file whose kernel sources
differ from today's, and it keeps entries rather than replacing them.

The result must be as fresh as a sweep's output, so the two files must come from the same hardware
and software (arch, GPU, Triton, torch, format, not a dry run), and every kernel that an entry of the
result configures must have today's source hash and candidate list in the file that entry comes
from. Otherwise nothing is written and the error names the kernels to re-tune.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from gsa_kernels import tuned_file
from tuning import yamlio

def _key(item: dict) -> tuple:
    """(op, problem key) of an entry or of a failed shape (one without a key matches nothing)."""
    return item.get("op", "chunk"), tuple(sorted(item.get("key", {}).items()))


def _stale_kernels(meta: dict, entries: list, want: dict) -> set:
    """The kernels configured by these entries whose hash or candidate list in meta is not today's."""
    used = yamlio.configured_kernels(entries)
    return {k for k in used
            if meta.get("kernel_hashes", {}).get(k) != want["kernel_hashes"].get(k)
            or meta.get("candidates", {}).get(k) != want["candidates"].get(k)}


def combine(base: dict, new: dict, note: str | None = None) -> dict:
    """The combined document, or ValueError saying why the two cannot be combined."""
    parts = {}
    for name, doc in (("BASE", base), ("NEW", new)):
        try:
            parts[name] = yamlio.resume_parts(doc)
        except ValueError as e:
            raise ValueError(f"{name} is not a tuned file: {e}") from None
    (base_meta, base_entries, base_failed), (new_meta, new_entries, new_failed) = parts["BASE"], parts["NEW"]
    replaced = {_key(e) for e in new_entries if isinstance(e, dict)}
    # BASE's entries that NEW replaces may predate today's candidate lists (a parameter added to a
    # kernel): only the entries it keeps must read as today's
    kept = [e for e in base_entries if not isinstance(e, dict) or _key(e) not in replaced]
    for name, entries, failed in (("BASE", kept, base_failed), ("NEW", new_entries, new_failed)):
        try:
            yamlio.check_resume_items(entries, failed)
        except ValueError as e:
            what = "its entries that NEW does not replace" if name == "BASE" else "its entries"
            raise ValueError(f"{name} is not a tuned file ({what}): {e}") from None
    differs = [f"{f}: {base_meta.get(f)!r} vs {new_meta.get(f)!r}" for f in yamlio.SAME_RUN
               if base_meta.get(f) != new_meta.get(f)]
    if differs:
        raise ValueError("BASE and NEW come from other hardware or software (" + "; ".join(differs) + ")")
    want = tuned_file.expected_meta()
    stale = {"BASE": _stale_kernels(base_meta, kept, want), "NEW": _stale_kernels(new_meta, new_entries, want)}
    if stale["BASE"] or stale["NEW"]:
        said = "; ".join(f"{name}'s entries configure {', '.join(sorted(ks))}" for name, ks in stale.items() if ks)
        raise ValueError(f"stale kernels ({said}, made from other sources or candidate lists than today's): "
                         f"re-tune them into NEW with the sweep (--seed BASE --kernels ...)")
    tried = replaced | {_key(f) for f in new_failed}        # NEW's verdicts on its shapes win
    failed = [f for f in base_failed if _key(f) not in tried] + new_failed
    search = {**new_meta.get("search", {}),
              "combined_with": f"the entries of the file of {base_meta.get('date')} that this run did not re-tune"}
    base_search = base_meta.get("search") if isinstance(base_meta.get("search"), dict) else {}
    if base_search.get("note") or base_search.get("base_note"):        # where the kept entries came from
        search["base_note"] = base_search.get("note") or base_search.get("base_note")
    if note:
        search["note"] = note
    # complete as BASE: each of its shapes keeps an entry (its own or NEW's); a NEW cut short by its
    # time budget re-tuned fewer shapes, and lacks none of BASE's
    meta = {**new_meta, "complete": bool(base_meta.get("complete")),
            "kernel_hashes": want["kernel_hashes"], "candidates": want["candidates"], "search": search}
    return {"meta": meta, "entries": yamlio.sort_entries(kept + new_entries), "failed": failed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tuning.combine", description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="the tuned file to update (e.g. tuned_configs/sm90-nvidia-h200.yaml)")
    p.add_argument("new", type=Path, help="a sweep's output whose entries replace BASE's")
    p.add_argument("--output", type=Path, default=None, help="where to write (default: BASE)")
    p.add_argument("--note", default=None, help="the combined file's search note: where its entries come from")
    args = p.parse_args(argv)
    try:
        docs = [yamlio.read_yaml(path) for path in (args.base, args.new)]
        doc = combine(*docs, note=args.note)
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"tuning.combine: {e}", file=sys.stderr)
        return 2
    out = args.output or args.base
    yamlio.atomic_write_yaml(out, doc)
    n_new = len(docs[1]["entries"])
    print(f"{out}: {len(doc['entries'])} entries ({n_new} from {args.new}, the rest from {args.base})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
