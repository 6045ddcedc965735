#!/usr/bin/env bash
# Nsight Compute on the chunk kernels of one fwd+bwd step, on the GPU (the device image has ncu).
#   usage: bash benchmarks/ncu_kernels.sh SHAPE LEVEL KERNEL [KERNEL ...]
#   e.g.   bash benchmarks/ncu_kernels.sh d 2 chunk_fwd_kernel chunk_bwd_keys_kernel
# Per kernel (its first launch in benchmarks/profile_kernels' step): $OUT/ncu_<kernel>.txt, the
# headline metrics (duration, occupancy, issue activity, throughput) and the stall reasons summed over
# the kernel with the hottest SASS instructions (benchmarks/ncu_stalls.py).
set -uo pipefail
shape=$1 level=$2; shift 2
OUT=${OUT:-/tmp/gsa-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
for kernel in "$@"; do
  rep=/tmp/ncu_$kernel
  ncu --clock-control none --set full --import-source yes -k "regex:^${kernel}$" -c 1 -f -o "$rep" \
    python3 -m benchmarks.profile_kernels --shapes "$shape" --levels "$level" > "/tmp/ncu_$kernel.log" 2>&1 \
    || { tail -20 "/tmp/ncu_$kernel.log"; continue; }
  {
    ncu -i "$rep.ncu-rep" --page details --csv | python3 -c '
import csv, sys
want = ("Duration", "Registers Per Thread", "Achieved Occupancy", "Theoretical Occupancy", "Block Limit",
        "Issue Slots Busy", "Executed Ipc Active", "Eligible Warps Per Scheduler", "Active Warps Per Scheduler",
        "Warp Cycles Per Issued Instruction", "Memory Throughput", "DRAM Throughput", "Compute (SM) Throughput",
        "L1/TEX Hit Rate", "L2 Hit Rate", "Shared Memory Configuration Size", "Dynamic Shared Memory Per Block",
        "Waves Per SM", "Grid Size", "Block Size")
rows = list(csv.reader(sys.stdin))
col = {n: i for i, n in enumerate(rows[0])}
name_i, value_i, unit_i = col["Metric Name"], col["Metric Value"], col["Metric Unit"]
for r in rows[1:]:
    if r[name_i].startswith(want):
        print(f"  {r[name_i]:45s} {r[value_i]:>14s} {r[unit_i]}")'
    ncu -i "$rep.ncu-rep" --page source --print-source sass --csv > "$rep.csv" 2>/dev/null \
      && python3 -m benchmarks.ncu_stalls "$rep.csv" --top 30
  } > "$OUT/ncu_$kernel.txt" 2>&1
  echo "== $kernel"; head -30 "$OUT/ncu_$kernel.txt"
done
