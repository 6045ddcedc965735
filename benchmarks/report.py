"""The benchmark report: speed, peak memory and the decode step against flash-linear-attention and
attention, as JSON, CSV, a markdown summary and PNG plots.

    python -m benchmarks.report [--out docs/benchmarks] [--resume] [--no-fla] [--quick] [--sections long,...]
    python -m benchmarks.report --plot-only docs/benchmarks/report.json    # redraw from saved results
    bash benchmarks/gpu_check.sh report                                     # on the device machine

What it measures (bf16, medians of triton.testing.do_bench after a warm-up call; benchmarks/bench_chunk.py
and benchmarks/bench_decode.py hold the timing code it shares):
  * "length": the paper's layer (H = 4, K = V = 512, M = 64) for T = 256 ... 32768 at a fixed
    32768 tokens per batch (B = 32768 / T): forward and forward+backward time and peak memory of
    gsa_kernels.chunk_gsa, flash-linear-attention's chunk_gsa and chunk_gla (same q/k/v sizes; GLA's
    gate is per key channel), and SDPA causal attention of the same hidden size (2048 = 8 heads x
    256) with its flash and cuDNN backends;
  * "shapes": the same for the shapes a-d of bench_chunk;
  * "long": the paper's layer at B = 1 and 4 for T = 4096 ... 262144 (up to a million tokens a batch),
    gsa_kernels against flash-linear-attention's chunk_gsa, time and its multiple of the byte floor:
    the sequence lengths GSA exists for, where few sequence-heads leave SMs idle;
  * "decode": one decode step (T = 1 with a float32 state) at B = 1, 8, 64, eager and in a CUDA graph.
Peak memory is the most memory allocated during one call beyond what the inputs already hold. The
byte floor (read q, k, v, s, g once and write o once; the backward adds do and the gradients) is
drawn at the device-to-device copy bandwidth measured in the same run.

Results are saved after every measurement, so a run cut short resumes where it stopped (--resume reads
the JSON in --out). flash-linear-attention (the `bench` extra) is optional: without it its rows are
absent and the summary says so. Progress goes to stdout with an ETA.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
TOKENS = 32768
LAYER = dict(H=4, D=512, M=64)           # the paper's layer; K = V = D
DECODE_BATCHES = [1, 8, 64]
LONG_LENGTHS = [4096, 8192, 16384, 32768, 65536, 131072, 262144]
LONG_BATCHES = [1, 4]
LONG_PROVIDERS = ["gsa_kernels", "fla_gsa"]
SECTIONS = ("length", "shapes", "long", "decode")
PROVIDERS = ["gsa_kernels", "fla_gsa", "fla_gla", "sdpa_flash", "sdpa_cudnn"]
MODES = ["fwd", "fwd+bwd"]
STYLE = {"gsa_kernels": ("C0", "o"), "fla_gsa": ("C1", "s"), "fla_gla": ("C2", "^"),
         "sdpa_flash": ("C3", "v"), "sdpa_cudnn": ("C4", "D"), "byte floor": ("k", "")}


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------

def op_providers(include_fla: bool) -> dict:
    """name -> (make_inputs(B, T, H, D, M), fn(*inputs) -> output tensor)."""
    from benchmarks.bench_chunk import make_inputs, sdpa_inputs
    from gsa_kernels import chunk_gsa

    def gsa_inputs(B, T, H, D, M):
        return make_inputs(B, T, H, D, M, torch.bfloat16)

    def gla_inputs(B, T, H, D, M):
        q, k, v, _, _ = make_inputs(B, T, H, D, M, torch.bfloat16, requires_grad=False)
        g = F.logsigmoid(torch.randn(B, T, H, D, device="cuda")) / 16
        return [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v, g)]

    def attention_inputs(B, T, H, D, M):
        return sdpa_inputs(B, T, H, D, torch.bfloat16)

    def sdpa(backend):
        def run(q, k, v):
            with torch.nn.attention.sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return run

    out = {"gsa_kernels": (gsa_inputs, lambda q, k, v, s, g: chunk_gsa(q, k, v, s, g)[0])}
    if include_fla:
        try:
            from fla.ops.gla import chunk_gla
            from fla.ops.gsa import chunk_gsa as fla_chunk_gsa
            out["fla_gsa"] = (gsa_inputs, lambda q, k, v, s, g: fla_chunk_gsa(q, k, v, s, g)[0])
            out["fla_gla"] = (gla_inputs, lambda q, k, v, g: chunk_gla(q, k, v, g)[0])
        except Exception as e:  # the optional peer
            print(f"# flash-linear-attention not available ({type(e).__name__}: {e}): its rows are skipped",
                  file=sys.stderr)
    SDP = torch.nn.attention.SDPBackend
    out["sdpa_flash"] = (attention_inputs, sdpa(SDP.FLASH_ATTENTION))
    out["sdpa_cudnn"] = (attention_inputs, sdpa(SDP.CUDNN_ATTENTION))
    return out


def measure_op(make, fn, B, T, H, D, M, mode):
    from benchmarks.bench_chunk import peak_memory_mib, time_op
    inputs = make(B, T, H, D, M)
    backward = mode == "fwd+bwd"
    ms = time_op(fn, inputs, backward)
    mib = peak_memory_mib(fn, inputs, backward)
    del inputs
    torch.cuda.empty_cache()
    return {"ms": ms, "peak_MiB": mib}


class Results:
    """Rows keyed by (section, label, provider, mode); written after every row (atomic replace)."""

    def __init__(self, path: Path, meta: dict, resume: bool):
        self.path, self.meta, self.rows = path, meta, []
        if resume and path.exists():
            self.rows = json.loads(path.read_text())["rows"]
            print(f"# resuming: {len(self.rows)} rows from {path}")

    def key(self, r):
        return (r["section"], str(r["label"]), r["provider"], r["mode"])

    def has(self, section, label, provider, mode):
        return (section, str(label), provider, mode) in {self.key(r) for r in self.rows}

    def add(self, row):
        self.rows = [r for r in self.rows if self.key(r) != self.key(row)] + [row]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))
        os.replace(tmp, self.path)


def device_meta(bw: float) -> dict:
    import triton
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "copy_GBps": bw / 1e9, "date": time.strftime("%Y-%m-%d")}
    try:
        import subprocess
        meta["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        meta["driver"] = "unknown"
    try:
        from importlib.metadata import version
        meta["fla"] = version("fla-core")
    except Exception:
        meta["fla"] = None
    return meta


def plan(args, provs):
    """Every (section, label, B, T, provider, mode) to measure, in order."""
    from benchmarks.bench_chunk import SHAPES
    work = []
    lengths = LENGTHS[::3] if args.quick else LENGTHS
    for T in lengths:
        for p in provs:
            for mode in MODES:
                work.append(("length", T, TOKENS // T, T, LAYER["H"], LAYER["D"], LAYER["M"], p, mode))
    for name, (B, T, H, D, M) in SHAPES.items():
        if args.quick and name != "a":
            continue
        for p in provs:
            for mode in MODES:
                work.append(("shapes", name, B, T, H, D, M, p, mode))
    for B in LONG_BATCHES[:1] if args.quick else LONG_BATCHES:
        for T in LONG_LENGTHS[::4] if args.quick else LONG_LENGTHS:
            for p in (p for p in LONG_PROVIDERS if p in provs):
                for mode in MODES:
                    work.append(("long", long_label(B, T), B, T, LAYER["H"], LAYER["D"], LAYER["M"], p, mode))
    return [w for w in work if w[0] in args.sections]


def long_label(B: int, T: int) -> str:
    return f"{B}x{T}"


def run(args):
    from benchmarks.bench_chunk import copy_bandwidth, floor_bytes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth()
    results = Results(out / "report.json", device_meta(bw), args.resume)
    provs = op_providers(not args.no_fla)
    work = plan(args, provs)
    todo = [w for w in work if not results.has(w[0], w[1], w[7], w[8])]
    print(f"# {results.meta['device']}, torch {results.meta['torch']}, triton {results.meta['triton']}, "
          f"fla {results.meta['fla']}, copy {bw / 1e9:.0f} GB/s: {len(todo)} of {len(work)} measurements to do",
          flush=True)
    # flash-linear-attention's chunk_gla last: its first call per head size autotunes for minutes, and
    # a call cut short should lose those rows rather than ours, the other peers' or the decode step
    todo.sort(key=lambda w: w[7] == "fla_gla")
    decode_done = "decode" not in args.sections or (
        args.resume and results.has("decode", "1", "gsa_kernels", "eager"))
    start = time.time()
    for i, (section, label, B, T, H, D, M, p, mode) in enumerate(todo):
        if p == "fla_gla" and not decode_done:
            measure_decode(results, bw, not args.no_fla)
            decode_done = True
        make, fn = provs[p]
        try:
            row = measure_op(make, fn, B, T, H, D, M, mode)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:   # e.g. a backend that rejects the shape
            row = {"ms": None, "peak_MiB": None, "error": str(e).splitlines()[0][:200]}
            torch.cuda.empty_cache()
        floor_ms = floor_bytes(B, T, H, D, M, torch.bfloat16, mode == "fwd+bwd") / bw * 1e3
        results.add({"section": section, "label": label, "B": B, "T": T, "H": H, "D": D, "M": M,
                     "provider": p, "mode": mode, "floor_ms": floor_ms, **row})
        done = i + 1
        eta = (time.time() - start) / done * (len(todo) - done)
        shown = f"{row['ms']:.3f} ms, {row['peak_MiB']:.0f} MiB" if row["ms"] is not None else row["error"]
        print(f"[{done}/{len(todo)}] {section} {label} B={B} T={T} {p} {mode}: {shown} "
              f"(elapsed {time.time() - start:.0f} s, ETA {eta:.0f} s)", flush=True)

    if not decode_done:
        measure_decode(results, bw, not args.no_fla)
    return results


def measure_decode(results, bw, include_fla):
    from benchmarks.bench_decode import H, K, M, V, providers, time_decode
    provs = providers(include_fla)
    for B in DECODE_BATCHES:
        times, _ = time_decode(B, provs)
        floor_ms = 2 * 4 * B * H * (K * M + M * V) / bw * 1e3
        for p, t in times.items():
            name = {"fla": "fla_gsa"}.get(p, p)
            for mode in ("eager", "graph"):
                results.add({"section": "decode", "label": str(B), "B": B, "T": 1, "H": H, "D": K, "M": M,
                             "provider": name, "mode": mode, "floor_ms": floor_ms, "ms": t[mode],
                             "peak_MiB": None})
        print(f"[decode] B={B}: " + ", ".join(f"{p} {t['eager'] * 1e3:.1f}/{t['graph'] * 1e3:.1f} us"
                                              for p, t in times.items()) + " (eager/graph)", flush=True)


# ---------------------------------------------------------------------------------------------
# writing: CSV, markdown summary, plots
# ---------------------------------------------------------------------------------------------

def write_csv(doc, path: Path):
    fields = ["section", "label", "B", "T", "H", "D", "M", "provider", "mode", "ms", "peak_MiB", "floor_ms", "error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in doc["rows"]:
            w.writerow(r)


def _get(rows, section, label, provider, mode):
    for r in rows:
        if (r["section"], str(r["label"]), r["provider"], r["mode"]) == (section, str(label), provider, mode):
            return r
    return None


def floor_multiple(r) -> str:
    """A row's time as a multiple of its byte floor, or "-"."""
    if r is None or r.get("ms") is None or not r.get("floor_ms"):
        return "-"
    return f"{r['ms'] / r['floor_ms']:.1f}x"


def summary_markdown(doc) -> str:
    m, rows = doc["meta"], doc["rows"]
    lines = [f"Measured on {m['device']} (driver {m.get('driver')}, CUDA {m.get('cuda')}), torch {m['torch']}, "
             f"Triton {m['triton']}, flash-linear-attention {m.get('fla') or 'absent'}, {m.get('date')}; "
             f"copy bandwidth {m['copy_GBps']:.0f} GB/s. bf16, medians of do_bench, ms.", ""]

    def fmt(r, key="ms", scale=1.0, digits=3):
        return "-" if r is None or r.get(key) is None else f"{r[key] * scale:.{digits}f}"

    def speedup(ours, other):
        if ours is None or other is None or ours.get("ms") is None or other.get("ms") is None:
            return "-"
        return f"{other['ms'] / ours['ms']:.2f}x"

    for section, labels, title in (("shapes", "abcd", "Shapes a-d [B, T, H, K=V, M]"),
                                   ("length", [str(t) for t in LENGTHS],
                                    f"The paper's layer at {TOKENS} tokens per batch, by T")):
        present = [lb for lb in labels if _get(rows, section, lb, "gsa_kernels", "fwd")]
        if not present:
            continue
        lines += [f"**{title}**", "",
                  "| case | mode | gsa_kernels | FLA chunk_gsa | speed-up | FLA chunk_gla | SDPA flash | SDPA cuDNN "
                  "| byte floor | gsa_kernels peak MiB | FLA chunk_gsa peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for lb in present:
            for mode in MODES:
                r = {p: _get(rows, section, lb, p, mode) for p in PROVIDERS}
                ours = r["gsa_kernels"]
                case = lb if section == "shapes" else f"T={lb}, B={ours['B']}"
                if section == "shapes":
                    case = f"{lb} [{ours['B']}, {ours['T']}, {ours['H']}, {ours['D']}, {ours['M']}]"
                lines.append(f"| {case} | {mode} | {fmt(ours)} | {fmt(r['fla_gsa'])} | {speedup(ours, r['fla_gsa'])} "
                             f"| {fmt(r['fla_gla'])} | {fmt(r['sdpa_flash'])} | {fmt(r['sdpa_cudnn'])} "
                             f"| {fmt(ours, 'floor_ms')} | {fmt(ours, 'peak_MiB', digits=0)} "
                             f"| {fmt(r['fla_gsa'], 'peak_MiB', digits=0)} |")
        lines.append("")
    longs = [long_label(B, T) for B in LONG_BATCHES for T in LONG_LENGTHS
             if _get(rows, "long", long_label(B, T), "gsa_kernels", "fwd")]
    if longs:
        lines += [f"**Long sequences**: the paper's layer (H {LAYER['H']}, K = V {LAYER['D']}, M {LAYER['M']}) "
                  "at B = 1 and 4", "",
                  "| [B, T] | mode | gsa_kernels | x byte floor | FLA chunk_gsa | x byte floor | speed-up "
                  "| gsa_kernels peak MiB | FLA chunk_gsa peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for lb in longs:
            for mode in MODES:
                ours, fla = _get(rows, "long", lb, "gsa_kernels", mode), _get(rows, "long", lb, "fla_gsa", mode)
                lines.append(f"| [{ours['B']}, {ours['T']}] | {mode} | {fmt(ours)} | {floor_multiple(ours)} "
                             f"| {fmt(fla)} | {floor_multiple(fla)} | {speedup(ours, fla)} "
                             f"| {fmt(ours, 'peak_MiB', digits=0)} | {fmt(fla, 'peak_MiB', digits=0)} |")
        lines.append("")
    if _get(rows, "decode", "1", "gsa_kernels", "eager"):
        lines += ["**Decode step** (H 4, K = V 512, M 64, float32 state), us", "",
                  "| B | floor | gsa_kernels eager | FLA eager | gsa_kernels CUDA graph | FLA CUDA graph |",
                  "|---|---|---|---|---|---|"]
        for B in DECODE_BATCHES:
            g = {(p, mo): _get(rows, "decode", B, p, mo) for p in ("gsa_kernels", "fla_gsa") for mo in ("eager", "graph")}
            lines.append(f"| {B} | {fmt(g['gsa_kernels', 'eager'], 'floor_ms', 1e3, 1)} "
                         f"| {fmt(g['gsa_kernels', 'eager'], 'ms', 1e3, 1)} | {fmt(g['fla_gsa', 'eager'], 'ms', 1e3, 1)} "
                         f"| {fmt(g['gsa_kernels', 'graph'], 'ms', 1e3, 1)} | {fmt(g['fla_gsa', 'graph'], 'ms', 1e3, 1)} |")
        lines.append("")
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines.append("Not measured: " + "; ".join(f"{r['provider']} {r['mode']} at {r['section']} {r['label']} "
                                                  f"({r['error'][:80]})" for r in errors))
    if not any(r["provider"].startswith("fla") for r in rows):
        lines.append("flash-linear-attention was not installed: its columns are empty.")
    return "\n".join(lines) + "\n"


def plot(doc, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, meta = doc["rows"], doc["meta"]
    lengths = sorted({r["T"] for r in rows if r["section"] == "length"})
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, mode in zip(axes, MODES):
        for p in PROVIDERS:
            pts = [(T, _get(rows, "length", T, p, mode)) for T in lengths]
            pts = [(T, r["ms"]) for T, r in pts if r and r.get("ms") is not None]
            if pts:
                color, marker = STYLE[p]
                ax.plot(*zip(*pts), color=color, marker=marker, label=p)
        floor = [(T, _get(rows, "length", T, "gsa_kernels", mode)) for T in lengths]
        floor = [(T, r["floor_ms"]) for T, r in floor if r]
        if floor:
            ax.plot(*zip(*floor), "k--", label=f"byte floor ({meta['copy_GBps']:.0f} GB/s copy)")
        ax.set(xscale="log", yscale="log", xlabel="T (B = %d / T)" % TOKENS, ylabel="ms",
               title=f"{mode}: H 4, K = V 512, M 64, bf16")
        ax.set_xticks(lengths, [str(t) for t in lengths], rotation=45)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{meta['device']}, torch {meta['torch']}, Triton {meta['triton']}, FLA {meta.get('fla')}",
                 fontsize=9)
    fig.tight_layout()
    files.append(out / "time_vs_T.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    if any(r["section"] == "long" for r in rows):
        files.append(plot_long(rows, meta, out / "time_vs_long_T.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for p in PROVIDERS:
        pts = [(T, _get(rows, "length", T, p, "fwd+bwd")) for T in lengths]
        pts = [(T, r["peak_MiB"]) for T, r in pts if r and r.get("peak_MiB") is not None]
        if pts:
            color, marker = STYLE[p]
            ax.plot(*zip(*pts), color=color, marker=marker, label=p)
    ax.set(xscale="log", xlabel="T (B = %d / T)" % TOKENS, ylabel="MiB beyond the inputs",
           title="peak memory, forward+backward")
    ax.set_xticks(lengths, [str(t) for t in lengths], rotation=45)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "memory_vs_T.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def plot_long(rows, meta, path: Path) -> Path:
    """Time against T at B = 1 and 4, ours and FLA's, with each batch's byte floor: one panel a mode."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, mode in zip(axes, MODES):
        for B, line in zip(LONG_BATCHES, ("-", "--")):
            series = {p: [] for p in LONG_PROVIDERS + ["byte floor"]}
            for T in LONG_LENGTHS:
                for p in LONG_PROVIDERS:
                    r = _get(rows, "long", long_label(B, T), p, mode)
                    if r and r.get("ms") is not None:
                        series[p].append((T, r["ms"]))
                        if p == "gsa_kernels":
                            series["byte floor"].append((T, r["floor_ms"]))
            for p, pts in series.items():
                if pts:
                    color, marker = STYLE[p]
                    ax.plot(*zip(*pts), line, color=color, marker=marker, label=f"{p}, B = {B}")
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="ms",
               title=f"{mode}: H {LAYER['H']}, K = V {LAYER['D']}, M {LAYER['M']}, bf16")
        ax.set_xticks(LONG_LENGTHS, [str(t) for t in LONG_LENGTHS], rotation=45)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{meta['device']}, torch {meta['torch']}, Triton {meta['triton']}, FLA {meta.get('fla')}; "
                 f"byte floor at the {meta['copy_GBps']:.0f} GB/s copy", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(doc, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    write_csv(doc, out / "report.csv")
    (out / "summary.md").write_text(summary_markdown(doc))
    try:
        files = plot(doc, out)
        print("# plots: " + ", ".join(str(f) for f in files))
    except ImportError:
        print("# matplotlib is not installed: no plots (pip install matplotlib; then --plot-only)")
    print(summary_markdown(doc))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/benchmarks", help="folder for report.json/.csv, summary.md, PNGs")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in OUT/report.json")
    ap.add_argument("--no-fla", action="store_true", help="leave out flash-linear-attention")
    ap.add_argument("--quick", action="store_true", help="a few lengths and shape a only (a smoke run)")
    ap.add_argument("--sections", default=",".join(SECTIONS), type=lambda v: v.split(","),
                    help=f"which parts to measure, comma-separated (default: all of {', '.join(SECTIONS)})")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw CSV, summary and plots from saved results")
    ap.add_argument("--json-only", action="store_true",
                    help="write OUT/report.json alone (a GPU call returns few files; draw later with --plot-only)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        ap.error(f"--sections: unknown {', '.join(unknown)} (expected some of {', '.join(SECTIONS)})")
    if args.plot_only:
        doc = json.loads(Path(args.plot_only).read_text())
        write_outputs(doc, Path(args.out))
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks.report needs a CUDA GPU (or --plot-only JSON)")
    results = run(args)
    doc = {"meta": results.meta, "rows": results.rows}
    if args.json_only:
        print(summary_markdown(doc))
    else:
        write_outputs(doc, Path(args.out))


if __name__ == "__main__":
    main()
