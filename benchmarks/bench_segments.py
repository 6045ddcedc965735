"""The two-level state walk against the one-level walk: chunk_gsa's kernel time (CUDA graph) per
SEGMENT value of the three state walks (states_fwd, states_fwd_compact, states_bwd), the rest of
each walk's config and every other kernel as they launch without an override.

    python -m benchmarks.bench_segments [--shapes c,f,g,h] [--segments 1,0,16,32,64] [--split 0] [--json PATH]

SEGMENT 1 is the one-level walk, 0 the rule's pick (configs.walk_segment_chunks), L >= 2 segments
of L chunks. Shapes are benchmarks/bench_chunk.py's.
"""
from __future__ import annotations

import argparse
import json

import torch

from benchmarks.bench_chunk import SHAPES, make_inputs, time_op
from gsa_kernels import chunk_gsa, configs, launches

WALKS = ("states_fwd", "states_fwd_compact", "states_bwd")


def walk_override(shape, dtype, segment, split=None, BT=32):
    B, T, H, D, M = shape
    key = dict(K=D, V=D, M=M, dtype=dtype, BT=BT, tokens=B * T * H, seqs=B * H)
    out = {kernel: dict(configs.launch_config(kernel, **key), SEGMENT=segment) for kernel in WALKS}
    if split is not None:
        for cfg in out.values():
            cfg["SPLIT"] = split
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="c,f,g,h")
    ap.add_argument("--segments", default="1,0,16,32,64")
    ap.add_argument("--split", type=int, default=None, help="also set every walk's SPLIT (0 paired, 1 split)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = torch.bfloat16
    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        inputs = make_inputs(*shape, dtype)
        for segment in (int(x) for x in args.segments.split(",")):
            row = {"shape": name, "dims": list(shape), "SEGMENT": segment, "SPLIT": args.split}
            with launches.override(walk_override(shape, dtype, segment, args.split)):
                for label, level, backward in (("fwd", 2, False), ("fwd+bwd", 2, True), ("fwd+bwd level0", 0, True)):
                    fn = lambda q, k, v, s, g, level=level: chunk_gsa(q, k, v, s, g, checkpoint_level=level)[0]  # noqa: E731
                    row[label] = time_op(fn, inputs, backward, graph=True)
            rows.append(row)
            print(f"{name} {shape} SEGMENT={segment:3d} SPLIT={args.split}: " + "  ".join(
                f"{k} {row[k]:.3f}" for k in ("fwd", "fwd+bwd", "fwd+bwd level0")) + " ms", flush=True)
        del inputs
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
