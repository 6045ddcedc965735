"""The competing backend: torch.compile of the pure-PyTorch chunked form, timed per shape.

Run in a subprocess with a time limit (`--compile-timeout`, default 300 s): max-autotune compiles
of one shape took minutes, and a sweep slice must not die inside one; mode "default"
(`--compile-mode`, the sweep's default) compiles faster (~35 s for forward and backward on a CPU,
whatever T: the chunk states come from a scan of log2(#chunks) steps, not an unrolled loop). The
subprocess takes gsa_kernels.torch_chunked.compiled(mode) (what chunk_gsa dispatches to for an entry
that names that mode), checks forward and gradients against the float64 reference (the same gate as
the Triton candidates), then times forward and forward+backward like the kernels.

    python -m tuning.compile_backend '{"shape": [B, T, H, K, V, M], "dtype": "bfloat16", "mode": ..., ...}'
prints one JSON line: {"fwd_ms", "fwd_bwd_ms"} or {"error"}. With `--serve` it reads such lines from
its standard input and answers each with one line, resetting Dynamo between shapes (a new shape then
compiles as in a fresh process: no recompile limit, no shape marked dynamic by the ones before).

Importing torch and Inductor takes ~10 s a process, a third of a timed shape on the H200, so the
subprocesses are kept: `_run` borrows an idle `Worker` (a `--serve` process) or starts one, and
gives it back after a shape that ended well; a worker that failed, crashed or ran past its limit
is killed, and the next shape gets a new one. A sweep compiles every shape's form first, `jobs`
workers at a time ("warm": compile and run once, no check, no timing), into Inductor's and Triton's
on-disk caches, which every process shares; the timed run then finds its graphs compiled. A shape
whose up-front compile failed or ran past the limit is not compiled again: its entry records why
(`warm_in_subprocesses`).
"""
from __future__ import annotations

import atexit
import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor


class Worker:
    """One `python -m tuning.compile_backend --serve` process: `ask(cfg, timeout)` sends a shape and
    waits for its line; None when the process died or ran past the timeout (it is then killed)."""

    COMMAND = (sys.executable, "-m", "tuning.compile_backend", "--serve")

    def __init__(self, command=COMMAND):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(list(command),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(line)
        self.lines.put(None)                      # end of output: the process is gone

    def ask(self, cfg: dict, timeout: float) -> dict | None:
        try:
            self.proc.stdin.write(json.dumps(cfg) + "\n")
            self.proc.stdin.flush()
            line = self.lines.get(timeout=timeout)
        except (OSError, queue.Empty):
            line = None
        if line is None:
            self.close()
            return None
        return json.loads(line)

    def last_error(self) -> str:
        """The last line of its standard error (after it died): why."""
        self.stderr.seek(0)
        return (self.stderr.read().strip().splitlines() or ["no output"])[-1]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


_idle: list[Worker] = []
_idle_lock = threading.Lock()


def _borrow() -> Worker:
    with _idle_lock:
        if _idle:
            return _idle.pop()
    return Worker()


def close_workers():
    """End the idle workers (also at exit)."""
    with _idle_lock:
        workers, _idle[:] = list(_idle), []
    for w in workers:
        try:
            w.proc.stdin.close()
        except OSError:
            pass
        w.close()


atexit.register(close_workers)


def _run(shape, dtype: str, settings, *, warm: bool, timeout: float | None = None) -> dict:
    """One shape in a worker: its JSON line, or {"error": why} (a timeout, a crash, a failure);
    `timeout` shorter than --compile-timeout: a kill for lack of time adds "cut": True (no verdict
    on the shape)."""
    limit = settings.compile_timeout if timeout is None else min(timeout, settings.compile_timeout)
    cfg = {"shape": shape.as_list(), "dtype": dtype, "warmup_ms": settings.warmup_ms,
           "rep_ms": settings.rep_ms, "mode": settings.compile_mode, "warm": warm}
    worker = _borrow()
    t0 = time.monotonic()
    res = worker.ask(cfg, limit)
    if res is None:
        if time.monotonic() - t0 >= limit:
            return {"error": f"not timed: compiling took over {settings.compile_timeout:.0f} s (--compile-timeout)",
                    "cut": limit < settings.compile_timeout}
        return {"error": f"failed (exit {worker.proc.returncode}): {worker.last_error()[:300]}"}
    if res.get("error"):
        worker.close()                            # a failure may leave CUDA or Dynamo in a bad state
    else:
        with _idle_lock:
            _idle.append(worker)
    return res


def wins(compiled_fwd_bwd_ms: float, triton_fwd_bwd_ms: float, tie: float) -> bool:
    """The compiled form is dispatched to only where its forward+backward beats the kernels' by more
    than the near-tie window (a tie goes to the kernels: no compile on a model's first call)."""
    return compiled_fwd_bwd_ms < triton_fwd_bwd_ms * (1 - tie)


def measure_in_subprocess(shape, dtype: str, settings) -> dict:
    """{"fwd_ms", "fwd_bwd_ms"} of the compiled form at this shape, or {"error": why}; a shape whose
    up-front compile failed (settings.compile_failed) is not compiled again."""
    failed = (settings.compile_failed or {}).get((tuple(shape.as_list()), dtype))
    if failed is not None:
        return {"error": f"{failed} (the sweep's up-front compile)"}
    return _run(shape, dtype, settings, warm=False)


def warm_in_subprocesses(work, settings, jobs: int, deadline: float | None = None) -> dict:
    """Compile the form of every (shape, dtype) in `work`, `jobs` subprocesses at a time, each within
    --compile-timeout and none past `deadline` (time.monotonic()). Returns {(shape as a tuple, dtype):
    why} for those that failed; one cut or never started for lack of time is no failure (its timed
    run compiles it)."""
    def one(item):
        shape, dtype = item
        key = (tuple(shape.as_list()), dtype)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left < 1:
            return key, None
        res = _run(shape, dtype, settings, warm=True, timeout=left)
        return key, None if res.get("cut") else res.get("error")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return {key: why for key, why in pool.map(one, work) if why is not None}


def measure_one(cfg: dict) -> dict:
    """One shape: {"warm": True} after compiling and running once, else {"fwd_ms", "fwd_bwd_ms"}, or
    {"error"} when the correctness gate rejects the compiled form."""
    import torch
    from gsa_kernels import torch_chunked
    from tuning import measure
    from tuning.shapes import Shape
    shape, dtype = Shape(*cfg["shape"]), cfg["dtype"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = measure.Inputs(shape, dtype, device)
    fn = torch_chunked.compiled(cfg["mode"])
    do = inputs.do

    def fwd(xs):
        return fn(*xs)[0]

    def fwd_bwd(xs):
        o = fwd(xs)
        return o, torch.autograd.grad(o, xs, do)

    if cfg.get("warm"):
        # the graphs the timed run calls (forward with autograd, backward), compiled into the shared
        # caches and run once; the timed run checks and times
        fwd_bwd(inputs.sets[0])
        return {"warm": True}
    o, grads = fwd_bwd(inputs.sets[0])
    reason = measure.check(measure.Reference(inputs), o, grads)
    if reason is not None:
        return {"error": f"rejected by the correctness gate: {reason}"}
    timer = measure.Timer(device, cfg["warmup_ms"], cfg["rep_ms"])
    fwd_ms = timer(measure.rotating([lambda xs=xs: fwd(xs) for xs in inputs.sets]))
    fwd_bwd_ms = timer(measure.rotating([lambda xs=xs: fwd_bwd(xs) for xs in inputs.sets]))
    return {"fwd_ms": round(fwd_ms, 4), "fwd_bwd_ms": round(fwd_bwd_ms, 4)}


def serve(lines, out=None):
    """A worker's loop: one JSON answer per JSON line read, Dynamo reset before each shape."""
    import torch
    out = out or sys.stdout
    for line in lines:
        if not line.strip():
            continue
        torch._dynamo.reset()
        try:
            res = measure_one(json.loads(line))
        except Exception as e:   # noqa: BLE001 - any failure is this shape's verdict; the parent restarts us
            res = {"error": f"failed: {type(e).__name__}: {e}"[:300]}
        print(json.dumps(res), file=out, flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--serve"]:
        import torch  # noqa: F401 - the imports a worker exists to pay once, before its first shape
        import torch._inductor  # noqa: F401
        from gsa_kernels import torch_chunked  # noqa: F401
        serve(sys.stdin)
        return
    print(json.dumps(measure_one(json.loads(argv[0]))))


if __name__ == "__main__":
    main()
