#!/usr/bin/env bash
# One GPU session's check, for the device tool: the whole test suite on CUDA, then the benchmarks side by
# side with flash-linear-attention (carried as a wheel in .whl/, see shared/GPU.md). Logs land in $OUT.
#   usage: bash benchmarks/gpu_check.sh [tests|profile|bench|decode|all] [pytest targets and args; default: tests]
#   BENCH_ARGS="--shapes a --no-fla" bash benchmarks/gpu_check.sh bench
#   decode: the token-by-token, decode and layer tests, then benchmarks/bench_decode.py (vs FLA, eager and
#   CUDA graph, B = 1, 8, 64, GSAModel tokens/s); DECODE_ARGS="--sweep" adds the decode config sweep.
set -uo pipefail
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/gsa-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  [ $# -gt 0 ] || set -- tests
  python3 -m pytest -q -rs --durations=10 "$@" 2>&1 | tee "$OUT/tests.log" || status=1
fi
if [ "$what" = profile ] || [ "$what" = all ]; then
  python3 -m benchmarks.profile_kernels 2>&1 | tee "$OUT/profile.log" || status=1
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 -m benchmarks.bench_chunk ${BENCH_ARGS:-} --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" || status=1
fi
if [ "$what" = decode ] || [ "$what" = all ]; then
  if [ "$what" = decode ]; then
    [ $# -gt 0 ] || set -- tests/test_recurrent.py tests/test_decode.py tests/test_layers.py
    python3 -m pytest -q -rs --durations=10 "$@" 2>&1 | tee "$OUT/tests_decode.log" || status=1
  fi
  python3 -m benchmarks.bench_decode ${DECODE_ARGS:-} --json "$OUT/bench_decode.json" 2>&1 | tee "$OUT/bench_decode.log" || status=1
fi
exit $status
