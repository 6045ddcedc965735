"""python -m tuning.sweep --arch sm90 [--shapes PRESET|FILE] [--dtypes ...] [--kernels ...]
                          [--output PATH] [--resume [PATH]] [--time-budget S] [--dry-run] ...

Tunes every shape x dtype of the grid on the present GPU (tuning/search.py says how) and writes
tuned_configs/<arch>-<model>.yaml, the file of this GPU model (e.g. sm90-nvidia-h200.yaml: read first
on that model, gsa_kernels/lookup.py; schema: tuning/yamlio.py). The file is rewritten atomically after every
shape, so an interrupted sweep loses at most the shape it was on; `--resume` keeps the shapes a
previous run already wrote (it must have been made on the same GPU with the same software) and
tunes the rest. `--time-budget S` stops cleanly before a shape that would end past S seconds (by the
mean shape time so far), so a sweep fits a 10-minute device call and the next call resumes.

Exit codes: 0 done or stopped by the budget (the summary says which), 2 bad arguments, a GPU that is
not --arch, or a resume file from other software.

--dry-run runs the whole pipeline in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set here
before Triton is imported) on the `tiny` grid with at most 2 candidates per kernel, skips the
torch.compile timing (recorded as a note) and writes a file marked `dry_run: true`, by default to
a temporary path and never over a shipped tuned file. CI runs it (tests/test_tuning.py).
"""
from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv[1:]:
    # must precede the first import of triton (gsa_kernels, tuning.search and torch's inductor import it)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


class Progress:
    """A progress bar with an ETA on stderr; plain lines (at most one per 10 s) when not a terminal."""

    def __init__(self, total_units: int, total_shapes: int, stream=sys.stderr):
        self.total, self.done, self.shapes, self.shape_i = max(1, total_units), 0, total_shapes, 0
        self.t0, self.last_print, self.stream = time.monotonic(), 0.0, stream
        self.tty = stream.isatty()
        self.label = ""

    def start_shape(self, label: str):
        self.shape_i += 1
        self.label = label
        self._print(force=True)

    def __call__(self, n: int = 1):
        self.done += n
        self._print()

    def eta(self) -> float | None:
        el = time.monotonic() - self.t0
        return None if self.done == 0 else el / self.done * max(0, self.total - self.done)

    def _print(self, force=False):
        now = time.monotonic()
        if not self.tty and not force and now - self.last_print < 10:
            return
        self.last_print = now
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        eta = self.eta()
        eta_s = "?" if eta is None else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        line = (f"[{bar}] {self.done}/{self.total} timings, shape {self.shape_i}/{self.shapes} "
                f"{self.label}, elapsed {int(now - self.t0)}s, ETA {eta_s}")
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are the sweep's one error line (no usage block), exit status 2 as usual."""

    def error(self, message):
        sys.exit(fail(message))


def parse_args(argv):
    p = _Parser(prog="python -m tuning.sweep", description=__doc__.split("\n\n")[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, help="the GPU arch to tune for, e.g. sm90 (must be the GPU present)")
    p.add_argument("--op", choices=("chunk", "recurrent"), default="chunk",
                   help="the op whose kernels to tune: chunk_gsa's (default) or fused_recurrent_gsa's, the decode "
                        "step included (entries with op: recurrent)")
    p.add_argument("--shapes", default=None,
                   help="presets bench,common,common-full,long,decode,short,tiny,tiny-recurrent (comma-separated) "
                        "or a YAML/JSON FILE (default: bench,common,long, with --op recurrent decode,short; tiny "
                        "or tiny-recurrent with --dry-run)")
    p.add_argument("--dtypes", default=None, help="comma-separated: bf16,fp16,fp32 (default: bf16,fp16; fp16 "
                                                  "with --dry-run, whose interpreter miscomputes bf16 dots)")
    p.add_argument("--seed", default=None, metavar="FILE",
                   help="start every kernel from FILE's entry for the shape (its configs and chunk size) instead "
                        "of the defaults; with --kernels the others keep FILE's configs, so after a change to "
                        "some kernels only theirs are re-tuned (FILE may be stale; it must be a GPU sweep)")
    p.add_argument("--kernels", default=None, help="comma-separated kernels to tune (default: all of "
                                                   "gsa_kernels/candidates.py); the others keep their defaults, or "
                                                   "--seed's configs")
    p.add_argument("--output", default=None, help="where to write (default: tuned_configs/<arch>-<model>.yaml, "
                                                  "the present GPU model's file; a temp file with --dry-run)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="keep the entries of PATH (default: --output) and tune only the shapes it lacks")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop cleanly before a shape that would end after SECONDS")
    p.add_argument("--dry-run", action="store_true", help="the whole pipeline in Triton's interpreter on the CPU")
    p.add_argument("--max-candidates", type=int, default=None,
                   help="per kernel and chunk size, after pruning (default: all; 2 with --dry-run)")
    p.add_argument("--passes", type=int, default=1, help="coordinate-descent passes (default 1)")
    p.add_argument("--bt-top", type=int, default=1, help="chunk sizes refined by coordinate descent (default 1)")
    p.add_argument("--tie", type=float, default=0.02, help="near-tie window, fraction (default 0.02)")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel compile workers (default: CPUs - 2, at most 14, on a GPU; 0 in a dry run)")
    p.add_argument("--compile-backend", choices=("on", "off"), default=None,
                   help="time torch.compile(chunk_gsa_torch) per shape (default on; off with --dry-run)")
    p.add_argument("--compile-mode", choices=("default", "max-autotune-no-cudagraphs"), default="default",
                   help="the torch.compile mode it is timed in, and dispatched with where it wins (default: "
                        "default, the cheapest compile; max-autotune-no-cudagraphs took over 250 s a shape)")
    p.add_argument("--compile-timeout", type=float, default=300.0, help="seconds per shape for it (default 300)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up (default 25)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time (default 100)")
    return p.parse_args(argv)


def fail(msg: str) -> int:
    # one line, whatever the message quotes (a YAML error spans several), so a log grep finds it whole
    line = re.sub(r"\s*[\r\n]+\s*", " ", str(msg).strip())
    print(f"tuning.sweep: error: {line}", file=sys.stderr)
    return 2


# What a string option must hold; an empty one would otherwise fall back to the default silently
# (an empty --output to the shipped tuned file).
STRING_OPTIONS = {"shapes": "presets or a FILE", "dtypes": "dtype names", "kernels": "kernel names",
                  "seed": "a tuned FILE", "output": "a file path", "resume": "a tuned FILE (or no value)"}


def check_args(args) -> str | None:
    """The first argument that makes no sense on its own, as an error message; None if all are fine.
    Needs no GPU, no Triton and no file, so a typo is reported at once, before the GPU is looked at
    or anything is tuned.

    Ranges: --max-candidates, --passes and --bt-top count things to try (>= 1); --jobs may be 0 (no
    parallel compile); --time-budget, --compile-timeout and --rep-ms are lengths of time that must be
    positive and finite; --warmup-ms may be 0 (do_bench still warms up once); --tie is a fraction in
    [0, 1): at 1 or more the torch.compile backend, which must beat Triton by more than it, never could."""
    if not re.fullmatch(r"sm\d{2,3}", args.arch):
        return f"--arch must look like sm90 (sm<major><minor>), got {args.arch!r}"
    for name, what in STRING_OPTIONS.items():
        value = getattr(args, name)
        if isinstance(value, str) and not value.strip():
            return f"--{name}: expected {what}, got an empty value"
    for name in ("max_candidates", "passes", "bt_top", "jobs"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "jobs" else 1):
            return f"--{name.replace('_', '-')} must be >= {0 if name == 'jobs' else 1}, got {value}"
    positive = {"time_budget": "seconds", "compile_timeout": "seconds", "rep_ms": "milliseconds"}
    for name, unit in positive.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            return f"--{name.replace('_', '-')} must be a positive number of {unit}, got {value}"
    if not (math.isfinite(args.warmup_ms) and args.warmup_ms >= 0):
        return f"--warmup-ms must be a number of milliseconds >= 0, got {args.warmup_ms}"
    if not (math.isfinite(args.tie) and 0 <= args.tie < 1):
        return f"--tie must be a fraction >= 0 and < 1 (the near-tie window), got {args.tie}"
    return None


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = check_args(args)
    if problem:
        return fail(problem)
    import json

    import yaml

    from tuning import shapes
    try:
        dtypes = shapes.parse_dtypes(args.dtypes if args.dtypes is not None else
                                     ("float16" if args.dry_run else "bf16,fp16"))
    except ValueError as e:
        return fail(str(e))
    try:
        grid_shapes = shapes.parse_shapes(args.shapes if args.shapes is not None else
                                          shapes.DEFAULT_GRID[args.op, args.dry_run])
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        return fail(f"--shapes {args.shapes}: cannot read it ({type(e).__name__}: {e})")
    except ValueError as e:
        return fail(str(e))
    if args.dry_run and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return fail("--dry-run needs TRITON_INTERPRET=1 before Triton is imported: run it as "
                    "`python -m tuning.sweep --dry-run ...`")

    import torch
    from gsa_kernels import candidates
    from gsa_kernels._paths import tuned_configs_dir
    from gsa_kernels.problem_keys import bucket, current_arch, current_device_model, problem_key
    from gsa_kernels.tuned_file import device_file_name
    from tuning import precompile, search, yamlio

    kernels = None
    if args.kernels:
        kernels = tuple(k.strip() for k in args.kernels.split(","))
        space = candidates.op_candidates(args.op)
        unknown = [k for k in kernels if k not in space]
        if unknown:
            return fail(f"--kernels: unknown for --op {args.op}: {unknown}; known: {sorted(space)}")

    model = current_device_model()
    if args.output:
        output = Path(args.output)
    elif args.dry_run or model is None:
        output = Path(tempfile.gettempdir()) / f"gsa_kernels_dry_run_{args.arch}.yaml"
    else:
        output = tuned_configs_dir() / device_file_name(args.arch, model)
    if args.dry_run and output.resolve().parent == tuned_configs_dir().resolve() \
            and re.fullmatch(rf"{args.arch}(-[a-z0-9-]+)?\.yaml", output.name):
        return fail(f"--output {output}: a dry run never overwrites the shipped tuned configs")
    unwritable = yamlio.unwritable_reason(output)
    if unwritable:
        return fail(f"--output {output}{'' if args.output else ' (the default)'}: {unwritable}")

    present = current_arch()
    if not args.dry_run:
        if present is None:
            return fail(f"--arch {args.arch}: no CUDA GPU is present here, so nothing can be tuned for it "
                        f"(--dry-run exercises the pipeline on a CPU)")
        if present != args.arch:
            name = torch.cuda.get_device_name() if torch.cuda.is_available() else "unknown GPU"
            return fail(f"--arch {args.arch} but the GPU present is {present} ({name}): "
                        f"tune on a {args.arch} GPU, or pass --arch {present}")
    device = "cpu" if args.dry_run else "cuda"

    seed = seeded_from = None
    if args.seed:
        try:
            seed_doc = yamlio.read_yaml(Path(args.seed))
            seed_meta = seed_doc["meta"]
            if not isinstance(seed_meta, dict):
                raise TypeError(f"meta must be a mapping, got {type(seed_meta).__name__}")
            seed = {(e.get("op", "chunk"), problem_key(**e["key"])): e["configs"] for e in seed_doc["entries"]}
        except Exception as e:   # noqa: BLE001 - any unreadable file: say so, refuse
            return fail(f"--seed {args.seed}: not a tuned file ({type(e).__name__}: {e})")
        if bool(seed_meta.get("dry_run")) != args.dry_run or seed_meta.get("arch") != args.arch:
            return fail(f"--seed {args.seed}: made for {seed_meta.get('arch')}"
                        f"{' in a dry run' if seed_meta.get('dry_run') else ' on a GPU'}; seed this "
                        f"{'dry run' if args.dry_run else 'sweep'} from a {args.arch} "
                        f"{'dry run' if args.dry_run else 'GPU sweep'}")
        seeded_from = str(seed_meta.get("date"))

    settings = search.Settings(
        max_candidates=args.max_candidates if args.max_candidates is not None else (2 if args.dry_run else None),
        passes=args.passes, bt_top=args.bt_top, tie=args.tie,
        jobs=args.jobs if args.jobs is not None else (0 if args.dry_run else max(1, min(14, (os.cpu_count() or 2) - 2))),
        compile_backend=(args.compile_backend or ("off" if args.dry_run else "on")) == "on",
        compile_timeout=args.compile_timeout, compile_mode=args.compile_mode, warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms, kernels=kernels,
        seed=seed, seeded_from=seeded_from, op=args.op)
    meta = search.run_meta(arch=args.arch, dry_run=args.dry_run, device=device, settings=settings)
    if seed is not None and kernels is not None:
        # the kernels this run does not tune keep the seed's configs, measured on the seed's source of
        # them: carry its hashes, so that they count as stale wherever that source has changed since
        seed_hashes = seed_meta.get("kernel_hashes") if isinstance(seed_meta.get("kernel_hashes"), dict) else {}
        for kernel in candidates.op_candidates(args.op):
            if kernel not in kernels:
                meta["kernel_hashes"][kernel] = str(seed_hashes.get(kernel, "unknown"))

    entries, failed = [], []
    if args.resume is not None:
        source = output if args.resume is True else Path(args.resume)
        if source.is_dir():
            return fail(f"--resume {source}: is a directory; expected a tuned file")
        if source.is_file():
            try:
                old = yamlio.read_yaml(source)
            except Exception as e:   # noqa: BLE001 - any unreadable file: say so, refuse
                return fail(f"--resume {source}: not a tuned file ({type(e).__name__}: {e})")
            # every kept entry and failed shape is written back: one the schema does not allow would
            # end up in the new file (or crash the sweep after its first shapes), so refuse it here
            try:
                old_meta, old_entries, old_failed = yamlio.resume_parts(old)
            except ValueError as e:
                return fail(f"--resume {source}: not a tuned file: {e}")
            differs = yamlio.software_mismatch(old_meta, meta, used=yamlio.configured_kernels(old_entries))
            if differs:
                return fail(f"--resume {source} was made with other hardware or software ({'; '.join(differs)}); "
                            f"its times would not compare: drop --resume or remove the file")
            try:
                yamlio.check_resume_items(old_entries, old_failed)
            except ValueError as e:
                return fail(f"--resume {source}: malformed: {e}; fix or remove that item, or drop --resume")
            entries, failed = old_entries, old_failed
            print(f"resuming from {source}: {len(entries)} entries, {len(failed)} failed shapes kept", file=sys.stderr)
        elif args.resume is not True:
            return fail(f"--resume {source}: no such file")

    def key_of(shape, dtype):
        return {"K": shape.K, "V": shape.V, "M": shape.M, "dtype": dtype,
                "tokens": bucket(shape.B * shape.T * shape.H), "seqs": bucket(shape.B * shape.H)}

    # (op, key) of what the file holds: a chunk entry and a recurrent one may share a key
    have = [(e.get("op", "chunk"), e["key"]) for e in entries] + \
        [(f.get("op", "chunk"), f["key"]) for f in failed if "key" in f]
    jobs, seen = [], []
    for dtype in dtypes:              # dtype-major: with the default grid, bf16 bench shapes come first
        for shape in grid_shapes:
            key = key_of(shape, dtype)
            if (args.op, key) in have or key in seen:
                continue      # tuned already (resume), or the same key as an earlier shape of the grid
            seen.append(key)
            jobs.append((shape, dtype, key))

    def save(complete: bool):
        yamlio.atomic_write_yaml(output, {"meta": {**meta, "complete": complete},
                                          "entries": yamlio.sort_entries(entries), "failed": failed})

    total_units = sum(search.units(s, d, settings, arch=present) for s, d, _ in jobs)
    progress = Progress(total_units, len(jobs))
    print(f"tuning {len(jobs)} shapes x dtypes on {meta['gpu']} ({args.arch}{', dry run' if args.dry_run else ''}) "
          f"-> {output}", file=sys.stderr)
    t0 = time.monotonic()
    # temp files of an earlier run killed mid-write: nothing else writes them (two sweeps to one
    # file at once would clobber each other's results anyway), so they are garbage by now
    removed = yamlio.remove_stale_temp_files(output)
    if removed:
        print(f"removed {len(removed)} temp file(s) an interrupted write of {output} left: "
              f"{', '.join(p.name for p in removed)}", file=sys.stderr)
    save(complete=not jobs)
    with contextlib.ExitStack() as stack:
        if settings.jobs > 0 and device == "cuda" and jobs and args.op == "chunk":   # the workers run chunk_gsa
            settings.compiler = stack.enter_context(precompile.Compiler(settings.jobs))
            _compile_up_front(settings, jobs, present)
            if settings.compile_backend:
                _compile_forms_up_front(settings, jobs, None if args.time_budget is None else t0 + args.time_budget / 2)
        stopped = _tune_all(jobs, settings, device, progress, args.time_budget, entries, failed, save, t0)
    progress.close()
    took = time.monotonic() - t0
    if stopped:
        print(f"stopped by --time-budget after {took:.0f} s: {len(jobs) - stopped} shapes tuned, {stopped} left; "
              f"{output} holds the partial result: run again with --resume to go on", file=sys.stderr)
    else:
        print(f"done in {took:.0f} s: {len(entries)} entries, {len(failed)} failed -> {output}", file=sys.stderr)
    return 0


def _compile_up_front(settings, jobs, arch):
    """Every shape's start configs (and its first coordinate-descent candidates) compiled at once by the
    pool, before the first timing: the sweep's own launches then load them from Triton's cache."""
    from tuning import search
    ts = time.monotonic()
    tasks = [(label, cfgs, phase, shape, dtype) for shape, dtype, _ in jobs
             for label, cfgs, phase in search.compile_plan(shape, dtype, settings, arch)]
    print(f"compiling {len(tasks)} config sets of {len(jobs)} shapes on {settings.jobs} workers", file=sys.stderr)
    failures = settings.compiler.compile_many(tasks)
    settings.compiler.warmed.update((shape, dtype) for shape, dtype, _ in jobs)
    print(f"compiled in {time.monotonic() - ts:.0f} s ({len(failures)} failed in workers, tried again when timed)",
          file=sys.stderr)


def _compile_forms_up_front(settings, jobs, deadline):
    """The compiled PyTorch form of every shape (the competing backend) compiled before the first
    timing, half as many subprocesses at a time as the kernels' pool has workers (Inductor compiles in
    parallel itself), into the caches the timed subprocesses read; with --time-budget, within its
    first half (`deadline`), so that shapes still get tuned in this run."""
    from tuning import compile_backend
    ts = time.monotonic()
    workers = max(1, settings.jobs // 2)
    print(f"compiling the torch.compile form ({settings.compile_mode}) of {len(jobs)} shapes, {workers} at a time",
          file=sys.stderr)
    settings.compile_failed = compile_backend.warm_in_subprocesses([(shape, dtype) for shape, dtype, _ in jobs],
                                                                   settings, workers, deadline)
    print(f"compiled in {time.monotonic() - ts:.0f} s ({len(settings.compile_failed)} failed or over "
          f"--compile-timeout: not timed)", file=sys.stderr)


def _tune_all(jobs, settings, device, progress, time_budget, entries, failed, save, t0):
    """Tune the shapes in order, saving after each; the count left when the budget stopped it, or None."""
    import torch
    from tuning import search
    shape_times = []
    for i, (shape, dtype, key) in enumerate(jobs):
        elapsed = time.monotonic() - t0
        if time_budget is not None and shape_times and \
                elapsed + sum(shape_times) / len(shape_times) > time_budget:
            return len(jobs) - i
        progress.start_shape(f"{shape} {dtype}")
        ts = time.monotonic()
        result = search.tune_shape(B=shape.B, T=shape.T, H=shape.H, K=shape.K, V=shape.V, M=shape.M,
                                   dtype=dtype, device=device, settings=settings, progress=progress)
        shape_times.append(time.monotonic() - ts)
        if result["entry"] is not None:
            entries.append(result["entry"])
        else:
            failed.append({"op": settings.op, "key": key, "shape": shape.as_list(), "reason": result["failed"]})
            print(f"\nshape {shape} {dtype} failed: {result['failed']}", file=sys.stderr)
        save(complete=(i == len(jobs) - 1))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return None


if __name__ == "__main__":
    sys.exit(main())
