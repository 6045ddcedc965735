"""The intra-chunk slot work on its own: how fast it runs when nothing else shares its programs.

    python -m benchmarks.intra_probe [--shapes d,a,c] [--warps 1,2,4,8]

Each chunk kernel runs its intra-chunk helpers (kernels/intra.py) inside a program that also holds the
K / V loops' tiles: 231-255 registers and two programs an SM (`python -m tuning.registers`), so the
helpers' chain of log2(BT) dependent levels has little to hide its latency behind. At shape d that part
of the step (the time that does not scale with K and V) is about half of it (docs/history/perf-notes.md:
"The profile at d and a"). Split into a kernel of its own, the same work would hold a few [BT, BM] tiles and fit
many programs an SM; it would cost the bytes of its inputs and outputs instead. This probe times that
kernel at a shape's chunk grid, so the split can be judged before it is built:

    fwd  the forward's slot work between its two passes: scores = e^G * qh + apply_causal(A, s, G)
         (qh = q Hk and A = q k^T as the keys pass leaves them), the slot softmax p, and
         Av = matrix_causal(p, s, G); reads G, s, qh, A and writes the scores and Av (float32)
    bwd  the keys side of the backward: dA = matrix_causal(dz, s, G) and
         apply_anticausal(A, dz, G); reads G, s, dz, A and writes dA and the anticausal product

It prints the median kernel time (CUDA graph), its multiple of the bytes' floor at the measured copy
bandwidth, and the compiled kernel's registers and spills, per warp count. `--check` compares the
probe's outputs with their float64 definitions at a small size (runs in Triton's interpreter too).
"""
from __future__ import annotations

import argparse
import os

import torch
import triton
import triton.language as tl

from gsa_kernels.kernels.intra import apply_anticausal, apply_causal, load_gates, load_rows, matrix_causal
from reference.quadratic import causal_decay

SHAPES = {"a": (8, 2048, 4, 64), "c": (2, 8192, 4, 64), "d": (32, 512, 4, 64)}   # B, T, H, M


@triton.jit
def intra_probe_kernel(G_all, s, x, A, out_rows, out_square, H: tl.constexpr, M: tl.constexpr,
                       BT: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, BACKWARD: tl.constexpr):
    """Program (chunk, head) of a [B * T, H, M] layout whose sequences are whole chunks. x is qh (fwd)
    or dz (bwd), [B * T, H, M]; A and out_square are [chunks, H, BT, BT]; out_rows is like x."""
    pid, h = tl.program_id(0), tl.program_id(1)
    t0 = pid.to(tl.int64) * BT
    t = tl.arange(0, BT)
    m = tl.arange(0, BM)
    rows_off = (t0 * H + h) * M + t[:, None] * (H * M) + m[None, :]
    rows_mask = (m < M)[None, :]
    square_off = ((pid.to(tl.int64) * H + h) * BT + t[:, None]) * BT + t[None, :]
    G_chunk = G_all + (t0 * H + h) * M
    G = load_gates(G_chunk, t, H * M, BT, M, BM)
    sc = load_rows(s + (t0 * H + h) * M, t, H * M, BT, M, BM)
    xc = load_rows(x + (t0 * H + h) * M, t, H * M, BT, M, BM)
    Ac = tl.load(A + square_off)
    if BACKWARD:
        square = matrix_causal(xc, sc, G, G_chunk, H * M, BT, M, BT, BM, PREC)
        rows = apply_anticausal(Ac, xc, G, G_chunk, H * M, BT, M, BT, BM, PREC)
    else:
        rows = tl.exp(G) * xc + apply_causal(Ac, sc, G, G_chunk, H * M, BT, M, BT, BM, PREC)
        z = tl.where(rows_mask, rows, float("-inf"))
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
        square = matrix_causal(p, sc, G, G_chunk, H * M, BT, M, BT, BM, PREC)
    tl.store(out_rows + rows_off, rows, mask=rows_mask)
    tl.store(out_square + square_off, square)


def make_case(B, T, H, M, BT, device, seed=0):
    """(G, s, x, A) of a probe launch: G the within-chunk cumsum of model-like gates, float32."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.nn.functional.logsigmoid(torch.randn(B * T // BT, BT, H, M, generator=gen)) / 8
    G = g.cumsum(1).reshape(B * T, H, M)
    s = 1 - g.exp().reshape(B * T, H, M)
    x = torch.randn(B * T, H, M, generator=gen)
    A = torch.randn(B * T // BT, H, BT, BT, generator=gen)
    return [t.contiguous().to(device) for t in (G, s, x, A)]


def launch(case, H, M, BT, backward, num_warps=4, prec="tf32"):
    G, s, x, A = case
    out_rows, out_square = torch.empty_like(x), torch.empty_like(A)
    BM = triton.next_power_of_2(M)
    compiled = intra_probe_kernel[(A.shape[0], H)](G, s, x, A, out_rows, out_square, H=H, M=M, BT=BT, BM=BM,
                                                   PREC=prec, BACKWARD=backward, num_warps=num_warps)
    return out_rows, out_square, compiled


def expected(case, H, BT, backward):
    """The probe's outputs from their definitions, float64."""
    G, s, x, A = (t.double().cpu() for t in case)
    chunks = A.shape[0]
    G, s, x = (t.reshape(chunks, BT, H, -1).transpose(1, 2) for t in (G, s, x))    # [chunks, H, BT, M]
    decay = causal_decay(G)                                                          # [c, h, i, j, m]
    if backward:
        square = torch.einsum('chim,chjm,chijm->chij', x, s, decay)
        rows = torch.einsum('chij,chim,chijm->chjm', A, x, decay)
    else:
        rows = G.exp() * x + torch.einsum('chij,chjm,chijm->chim', A, s, decay)
        square = torch.einsum('chim,chjm,chijm->chij', rows.softmax(-1), s, decay)
    return rows.transpose(1, 2).reshape(-1, H, rows.shape[-1]), square


def check(device):
    """The probe against its definitions at a small size, both directions; returns the errors."""
    B, T, H, M, BT = 1, 64, 2, 20, 32
    case = make_case(B, T, H, M, BT, device, seed=3)
    errors = {}
    for backward in (False, True):
        got = launch(case, H, M, BT, backward, prec="ieee")[:2]
        for name, a, b in zip(("rows", "square"), got, expected(case, H, BT, backward)):
            errors[("bwd " if backward else "fwd ") + name] = ((a.double().cpu() - b).norm() / b.norm()).item()
    return errors


def floor_bytes(case):
    G, s, x, A = case
    return sum(t.numel() * t.element_size() for t in (G, s, x, A)) + x.numel() * 4 + A.numel() * 4


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="d,a,c")
    ap.add_argument("--warps", default="1,2,4,8")
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--check", action="store_true", help="only compare with the definitions (small size)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.check or device == "cpu":
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("no GPU: run with TRITON_INTERPRET=1 (the check only)")
        for name, err in check(device).items():
            print(f"{name}: relative error {err:.1e}")
        return
    from benchmarks.bench_chunk import copy_bandwidth
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}, copy {bw / 1e9:.0f} GB/s, chunk {args.chunk}, float32 operands, tf32 dots")
    for name in args.shapes.split(","):
        B, T, H, M = SHAPES[name]
        case = make_case(B, T, H, M, args.chunk, device)
        for backward in (False, True):
            floor_us = floor_bytes(case) / bw * 1e6
            for warps in (int(w) for w in args.warps.split(",")):
                *_, compiled = launch(case, H, M, args.chunk, backward, warps)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    launch(case, H, M, args.chunk, backward, warps)
                us = triton.testing.do_bench(graph.replay, return_mode="median") * 1e3
                print(f"{name} {'bwd' if backward else 'fwd'} warps {warps}: {us:7.1f} us "
                      f"({us / floor_us:4.1f}x its {floor_us:.1f} us floor), regs {compiled.n_regs}, "
                      f"spills {compiled.n_spills}", flush=True)


if __name__ == "__main__":
    main()
