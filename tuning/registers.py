"""Registers, spills and shared memory of each kernel an op launches, compiled for a GPU on the CPU.

    python -m tuning.registers --shape K,V,M [--op chunk|recurrent] [--dtype bf16] [--T 128]
        [--entry tuned_configs/sm90-nvidia-h200.yaml --entry-shape B,T,H,K,V,M | --configs JSON] [--arch 90]

What decides how many programs share an SM (and whether a tile spills) is ptxas's register count,
which needs no GPU: Triton compiles for any target on the CPU and ships ptxas and cuobjdump. The op
runs once in Triton's interpreter (a child process, TRITON_INTERPRET=1) at [1, T, 1, K, V, M], forward
and backward and the forward without gradients, under the given configs (launches.override; default:
each kernel's default config at that shape), and records each launch: the kernel, its arguments'
types and 16-byte alignment, its constexprs and options. Each distinct launch is then compiled (in a
child without the interpreter) for sm_<arch> with the same specialization, and `cuobjdump -res-usage`
read: REG, STACK (the stack frame per thread, where ptxas spills), LOCAL and SHARED, with the programs
per SM those allow (65536 registers, 2048 threads, 32 blocks and 227 KB of shared memory per SM on
sm90), and the layout conversions in the TTGIR (cvt). bfloat16 runs too: the interpreter's wrong
bfloat16 dots (checks.check_interpreter) change no launch, except that non-finite garbage may add the
forward's SAFE re-run. The T and B the kernels see are small, so shape-dependent paths (the two-level
walks) are those of one short sequence: name their configs to compile others; choices made by the
device are a CPU's (the decode step's PDL is off).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

REGISTERS_PER_SM, THREADS_PER_SM, BLOCKS_PER_SM, SHARED_PER_SM = 65536, 2048, 32, 227 * 1024


def _describe(x):
    import torch
    if isinstance(x, torch.Tensor):
        return ["tensor", str(x.dtype).removeprefix("torch."), x.data_ptr() % 16 == 0]
    if x is None:
        return ["none"]
    if isinstance(x, bool):
        return ["bool", x]
    if isinstance(x, int):
        return ["int", x]
    if isinstance(x, float):
        return ["float"]
    raise TypeError(f"an argument of type {type(x).__name__}")


def record(shape, dtype: str, op: str, configs: dict, level: int | None = None) -> list[dict]:
    """The distinct launches of the op at shape [B, T, H, K, V, M] (run in the interpreter); level: the
    chunk op's checkpoint_level (None: its default), whose forms of the backward kernels differ."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction
    from gsa_kernels import checks, chunk_gsa, fused_recurrent_gsa, launches
    from tuning.measure import make_inputs
    from tuning.shapes import Shape

    seen, out = set(), []
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        item = {"module": self.fn.__module__, "name": self.fn.__name__, "args": [_describe(a) for a in args],
                "kwargs": {k: v for k, v in kwargs.items()}}
        key = json.dumps(item, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(item)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    # the interpreter's bfloat16 dots are wrong (checks.check_interpreter refuses them): only the
    # launches are wanted here, not the values
    checks.check_interpreter, refuse = (lambda *a, **k: None), checks.check_interpreter
    try:
        xs = make_inputs(Shape(*shape), dtype, "cpu")
        fn = chunk_gsa if op == "chunk" else fused_recurrent_gsa
        kw = {} if level is None else {"checkpoint_level": level}
        with launches.override(configs):
            o = fn(*xs, **kw)[0]
            torch.autograd.grad(o, xs, torch.randn_like(o))
            with torch.no_grad():
                fn(*xs)
    finally:
        InterpretedFunction.run, checks.check_interpreter = run, refuse
    return out


_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int32": "i32",
          "int64": "i64", "int8": "i8", "uint8": "u8", "bool": "i1"}


def compile_launch(item: dict, arch: int) -> dict:
    """REG / LOCAL / STACK / SHARED of one recorded launch compiled for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(item["module"]), item["name"])
    params = list(inspect.signature(fn.fn).parameters)
    kwargs = dict(item["kwargs"])
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in params}
    values = dict(zip(params, item["args"]))
    constexprs, signature, attrs = {}, {}, {}
    for i, name in enumerate(params):
        if name in kwargs:
            constexprs[name] = kwargs[name]
            signature[name] = "constexpr"
            continue
        kind, *rest = values[name]
        if kind == "tensor":
            signature[name] = "*" + _TYPES[rest[0]]
            if rest[1]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif kind == "int":
            signature[name] = "i32" if -2**31 <= rest[0] < 2**31 else "i64"
            if rest[0] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif kind == "float":
            signature[name] = "fp32"
        else:                                   # None and bools are specialized as constants
            constexprs[name] = None if kind == "none" else rest[0]
            signature[name] = "constexpr"
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    warps = options.get("num_warps", 4)
    regs, shared = int(usage["REG"]), max(int(usage["SHARED"]), kernel.metadata.shared)
    per_sm = min(REGISTERS_PER_SM // max(1, regs * 32 * warps), THREADS_PER_SM // (32 * warps), BLOCKS_PER_SM,
                 SHARED_PER_SM // shared if shared else 10**9)
    # ttg.convert_layout ops in the TTGIR: each moves a tile between two layouts (a dot's operand or
    # result and elementwise code), through shared memory unless a register shuffle can do it
    conversions = kernel.asm["ttgir"].count("ttg.convert_layout")
    return {"kernel": item["name"], "regs": regs, "local": int(usage["LOCAL"]), "stack": int(usage["STACK"]),
            "layout_conversions": conversions,
            "shared": shared, "num_warps": warps, "num_stages": options.get("num_stages"),
            "programs_per_sm": per_sm, "constexprs": constexprs}


def _shown(rows: list[dict]) -> list[dict]:
    """Per row, the constexprs worth printing: tiles (B*), walk forms, and whatever tells two launches
    of one kernel apart."""
    out = []
    for r in rows:
        same = [o["constexprs"] for o in rows if o["kernel"] == r["kernel"] and o is not r]
        differ = {k for o in same for k in r["constexprs"] if o.get(k) != r["constexprs"][k]}
        out.append({k: v for k, v in r["constexprs"].items()
                    if k.startswith("B") or k in ("SPLIT", "SEGMENT", "PDL") or k in differ})
    return out


def _child(what: str, payload: dict, interpret: bool):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    child = subprocess.run([sys.executable, "-m", "tuning.registers", f"--{what}", json.dumps(payload)],
                           env=env, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"{what} failed: {child.stderr.strip()[-2000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def report(shape, dtype: str, op: str, configs: dict, arch: int = 90, level: int | None = None) -> list[dict]:
    """One row per distinct launch: recorded in an interpreter child, compiled in a child without the
    interpreter (the kernels must be imported as JIT functions), whatever this process runs under."""
    launches = _child("record", {"shape": shape, "dtype": dtype, "op": op, "configs": configs, "level": level},
                      interpret=True)
    return _child("compile", {"launches": launches, "arch": arch}, interpret=False)


def _configs_from_entry(path: str, shape: list[int], dtype: str, op: str) -> dict:
    from tuning import yamlio
    doc = yamlio.read_yaml(path)
    for entry in doc.get("entries", []):
        if entry.get("shape") == shape and entry["key"]["dtype"] == dtype and entry.get("op", "chunk") == op:
            return entry["configs"]
    raise SystemExit(f"{path}: no {op} entry for {shape} {dtype}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tuning.registers", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", help="K,V,M (the kernels run at [1, T, 1, K, V, M])")
    p.add_argument("--T", type=int, default=128, help="tokens of the interpreter run (default 128)")
    p.add_argument("--op", choices=("chunk", "recurrent"), default="chunk")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--configs", default=None, help="JSON {kernel: config} for launches.override")
    p.add_argument("--entry", default=None, help="a tuned file: take the configs of its entry for --entry-shape")
    p.add_argument("--entry-shape", default=None, help="B,T,H,K,V,M of that entry")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--checkpoint-level", type=int, choices=(0, 1, 2), default=None,
                   help="the chunk op's checkpoint_level (default: its own default)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--record", default=None, help=argparse.SUPPRESS)
    p.add_argument("--compile", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.record:
        cfg = json.loads(args.record)
        print(json.dumps(record(cfg["shape"], cfg["dtype"], cfg["op"], cfg["configs"], cfg.get("level"))))
        return 0
    if args.compile:
        cfg = json.loads(args.compile)
        print(json.dumps([compile_launch(item, cfg["arch"]) for item in cfg["launches"]]))
        return 0
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype]
    configs = json.loads(args.configs) if args.configs else {}
    if args.entry:
        entry_shape = [int(x) for x in args.entry_shape.split(",")]
        configs = _configs_from_entry(args.entry, entry_shape, dtype, args.op)
        K, V, M = entry_shape[3:]
    else:
        K, V, M = (int(x) for x in args.shape.split(","))
    if args.checkpoint_level is not None and args.op != "chunk":
        p.error("--checkpoint-level: only for --op chunk")
    rows = report([1, args.T, 1, K, V, M], dtype, args.op, configs, args.arch, args.checkpoint_level)
    level = "" if args.checkpoint_level is None else f", checkpoint level {args.checkpoint_level}"
    print(f"# sm_{args.arch}, [1, {args.T}, 1, {K}, {V}, {M}] {dtype}, op {args.op}{level}")
    print(f"{'kernel':28s} {'regs':>5s} {'stack B':>7s} {'smem KB':>8s} {'warps':>5s} {'stages':>6s} {'progs/SM':>8s} "
          f"{'cvt':>4s}  tiles")
    for r, shown in zip(rows, _shown(rows)):
        print(f"{r['kernel']:28s} {r['regs']:5d} {r['stack'] + r['local']:7d} {r['shared'] / 1024:8.1f} {r['num_warps']:5d} "
              f"{str(r['num_stages']):>6s} {r['programs_per_sm']:8d} {r['layout_conversions']:4d}  {shown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
