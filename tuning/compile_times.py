"""Time the torch.compile backend for the chunk entries of a tuned file that lack its times.

    python -m tuning.compile_times tuned_configs/sm90-nvidia-h200.yaml --output OUT.yaml \
        [--dtypes bf16,fp16] [--retime] [--time-budget SECONDS] [--jobs N]

The sweep times the compiled PyTorch form beside the kernels (`--compile-backend on`), but it re-times
the kernels as well: ~28 s a shape on the H200, of which the compiled form is the smaller part. This
fills in the compiled form alone for entries whose kernels are already timed: every form compiled
first, `--jobs` workers at a time (tuning/compile_backend.py), then each timed in one worker, the
entry's `torch_compile_fwd` / `torch_compile_fwd_bwd` written beside the sweep's `triton_*` times and
its backend set to torch_compile where that wins by more than the file's tie window. The kernels'
times come from the sweep's run, the compiled form's from this one: the file must come from this GPU
model and this torch version (refused otherwise), and each entry's note says when each was timed.

The output is written after every shape (atomically) and starts from itself when it exists: run again
to go on after `--time-budget` stopped it.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from tuning import compile_backend

NOTE_PREFIX = "torch_compile:"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tuning.compile_times", description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="a tuned file made on this GPU model (its chunk entries are filled in)")
    p.add_argument("--output", default=None, help="where to write (default: FILE itself); an existing "
                                                  "output is the starting point (resume)")
    p.add_argument("--dtypes", default="bf16,fp16", help="entries of these dtypes (default bf16,fp16)")
    p.add_argument("--retime", action="store_true", help="also entries that already hold compiled times")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop cleanly before a shape that would end after SECONDS (compiles: the first half)")
    p.add_argument("--jobs", type=int, default=7, help="workers compiling at once (default 7: Inductor "
                                                        "compiles in parallel itself)")
    p.add_argument("--compile-mode", choices=("default", "max-autotune-no-cudagraphs"), default="default")
    p.add_argument("--compile-timeout", type=float, default=300.0, help="seconds per shape (default 300)")
    return p.parse_args(argv)


def todo(entries: list, dtypes: list[str], retime: bool) -> list[int]:
    """Indices of the chunk entries of these dtypes still to time."""
    return [i for i, e in enumerate(entries)
            if e.get("op", "chunk") == "chunk" and e["key"]["dtype"] in dtypes
            and (retime or "torch_compile_fwd_bwd" not in e.get("times_ms", {}))]


def record(entry: dict, res: dict, *, mode: str, tie: float, date: str) -> dict:
    """The entry with the compiled form's result: its times and the backend that wins, or why there
    are none. Earlier torch_compile notes are replaced."""
    entry = {**entry, "times_ms": dict(entry["times_ms"])}
    notes = [n for n in entry.get("notes", []) if not str(n).startswith(NOTE_PREFIX)]
    for k in ("torch_compile_fwd", "torch_compile_fwd_bwd"):
        entry["times_ms"].pop(k, None)
    entry["backend"] = "triton"
    entry.pop("compile_mode", None)
    if res.get("error"):
        notes.append(f"{NOTE_PREFIX} {res['error']} (tuning.compile_times, {date})")
    else:
        entry["times_ms"]["torch_compile_fwd"] = res["fwd_ms"]
        entry["times_ms"]["torch_compile_fwd_bwd"] = res["fwd_bwd_ms"]
        entry["compile_mode"] = mode
        triton = entry["times_ms"]["triton_fwd_bwd"]
        if compile_backend.wins(res["fwd_bwd_ms"], triton, tie):
            entry["backend"] = "torch_compile"
        notes.append(f"{NOTE_PREFIX} timed by tuning.compile_times on {date} (mode {mode}), forward+backward "
                     f"{res['fwd_bwd_ms'] / triton:.2f}x the kernels' time (timed by the sweep)")
    entry["notes"] = notes
    return entry


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def fail(msg):
        print(f"tuning.compile_times: error: {msg}", file=sys.stderr)
        return 2

    import torch

    from gsa_kernels.problem_keys import current_arch
    from tuning import search, shapes, yamlio
    try:
        dtypes = shapes.parse_dtypes(args.dtypes)
    except ValueError as e:
        return fail(str(e))
    if args.jobs < 1:
        return fail(f"--jobs must be >= 1, got {args.jobs}")
    output = Path(args.output or args.file)
    source = output if output.is_file() else Path(args.file)
    try:
        doc = yamlio.read_yaml(source)
        meta, entries = doc["meta"], doc["entries"]
    except Exception as e:   # noqa: BLE001 - any unreadable file: say so, refuse
        return fail(f"{source}: not a tuned file ({type(e).__name__}: {e})")
    if not torch.cuda.is_available():
        return fail("no CUDA GPU here: the compiled form is timed on the GPU the file was tuned on")
    gpu, arch = torch.cuda.get_device_name(), current_arch()
    if (meta.get("gpu"), meta.get("arch"), meta.get("dry_run")) != (gpu, arch, False):
        return fail(f"{source} was tuned on {meta.get('gpu')} ({meta.get('arch')}"
                    f"{', dry run' if meta.get('dry_run') else ''}); this is {gpu} ({arch}): its kernels' "
                    f"times would not compare")
    if meta.get("torch") != torch.__version__:
        return fail(f"{source} was made with torch {meta.get('torch')}, this is {torch.__version__}: "
                    f"the compiled form would be another torch's")
    search_meta = meta.get("search") or {}
    settings = search.Settings(compile_mode=args.compile_mode, compile_timeout=args.compile_timeout,
                               warmup_ms=float(search_meta.get("warmup_ms", 25.0)),
                               rep_ms=float(search_meta.get("rep_ms", 100.0)))
    tie = float(search_meta.get("tie", 0.02))
    left = todo(entries, dtypes, args.retime)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def save():
        meta.setdefault("search", {})["compile_times"] = (
            f"torch_compile times filled in by tuning.compile_times (mode {args.compile_mode}), last {date}")
        yamlio.atomic_write_yaml(output, doc)

    print(f"{len(left)} entries to time -> {output}", file=sys.stderr)
    save()
    t0 = time.monotonic()
    work = [(shapes.Shape(*entries[i]["shape"]), entries[i]["key"]["dtype"]) for i in left]
    deadline = None if args.time_budget is None else t0 + args.time_budget / 2
    settings.compile_failed = compile_backend.warm_in_subprocesses(work, settings, args.jobs, deadline)
    compile_backend.close_workers()       # one worker times; the others would idle holding a CUDA context
    print(f"compiled in {time.monotonic() - t0:.0f} s ({len(settings.compile_failed)} failed)", file=sys.stderr)
    took = []
    for n, (i, (shape, dtype)) in enumerate(zip(left, work)):
        if args.time_budget is not None and took and \
                time.monotonic() - t0 + max(took) > args.time_budget:
            print(f"stopped by --time-budget: {len(left) - n} entries left; run again to go on", file=sys.stderr)
            return 0
        ts = time.monotonic()
        res = compile_backend.measure_in_subprocess(shape, dtype, settings)
        entries[i] = record(entries[i], res, mode=args.compile_mode, tie=tie, date=date)
        took.append(time.monotonic() - ts)
        save()
        t = entries[i]["times_ms"]
        print(f"{shape} {dtype}: " + (f"compiled {t['torch_compile_fwd']:.3f} / {t['torch_compile_fwd_bwd']:.3f} ms, "
                                      f"kernels {t.get('triton_fwd')} / {t['triton_fwd_bwd']} ms (fwd / fwd+bwd)"
                                      if "torch_compile_fwd" in t else res.get("error", "")) +
              f" [{took[-1]:.0f} s]", file=sys.stderr)
    print(f"done in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
