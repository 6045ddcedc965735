"""Where a kernel's warps wait, from Nsight Compute's per-instruction source page.

On the GPU (the device image has ncu; give it --clock-control none):
    ncu --clock-control none --set full --import-source yes -k regex:states_fwd -o walk python3 SCRIPT
    ncu -i walk.ncu-rep --page source --print-source sass --csv > walk_sass.csv
Then anywhere:
    python -m benchmarks.ncu_stalls walk_sass.csv [--top 40]
prints the stall reasons summed over the kernel, then the instructions with the most stall samples and
their three largest reasons."""
from __future__ import annotations

import argparse
import collections
import csv

SAMPLES = "Warp Stall Sampling (All Samples)"


def read_source_page(path):
    """(header, rows) of ncu's --page source --csv output (its first line names the kernel)."""
    with open(path, newline="") as fh:
        lines = list(csv.reader(fh))
    return lines[1], lines[2:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="ncu -i REPORT --page source --print-source sass --csv output")
    ap.add_argument("--top", type=int, default=40, help="instructions to list")
    args = ap.parse_args(argv)
    header, rows = read_source_page(args.csv)
    col = {name: i for i, name in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]

    def count(row, name):
        value = row[col[name]]
        return int(value) if value.isdigit() else 0

    total = sum(count(r, SAMPLES) for r in rows) or 1
    by_reason = collections.Counter({h: sum(count(r, h) for r in rows) for h in reasons})
    print(f"stall samples: {total}")
    for reason, n in by_reason.most_common(10):
        print(f"  {reason[6:]:22s} {n:8d} {100 * n / total:5.1f}%")
    print(f"\ntop {args.top} instructions (index in the listing, samples, share, SASS, largest reasons):")
    for i in sorted(range(len(rows)), key=lambda i: -count(rows[i], SAMPLES))[:args.top]:
        row = rows[i]
        why = sorted(((count(row, h), h[6:]) for h in reasons if count(row, h)), reverse=True)[:3]
        n = count(row, SAMPLES)
        print(f"{i:5d} {n:6d} {100 * n / total:5.1f}%  {row[col['Source']].strip()[:60]:60s} {why}")


if __name__ == "__main__":
    main()
