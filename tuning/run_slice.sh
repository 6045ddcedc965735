#!/usr/bin/env bash
# The sweep and the first-call measurement on a GPU, shaped for device calls of at most 10 minutes.
#
#   bash tuning/run_slice.sh sweep [extra sweep args]   one slice (~9 min) of the sweep: resumes from
#        $PARTIAL (default tuned_configs/sm90.partial.yaml) when it exists and writes $OUT/sm90.yaml;
#        copy that back to $PARTIAL and run again until the summary says "done" (meta.complete: true),
#        then move it to tuned_configs/sm90-<model>.yaml (the GPU's model as the sweep's default
#        output names it, e.g. sm90-nvidia-h200.yaml) and commit it.
#   bash tuning/run_slice.sh first-call [MODES]          seconds to the first chunk_gsa fwd+bwd at shape a in
#        fresh processes with empty caches (MODES default yaml,autotune; fla in its own call: it can
#        take the whole 10 minutes)
#
# Env: ARCH (sm90), OUT (/tmp/gsa-out), PARTIAL, BUDGET (seconds of tuning per slice, default 480:
# the sweep stops before a shape it predicts would end later, and a shape takes a few minutes).
# flash-linear-attention is taken from .whl/*.whl when present (as benchmarks/gpu_check.sh does).
set -uo pipefail
what=${1:-sweep}; shift || true
ARCH=${ARCH:-sm90}
OUT=${OUT:-/tmp/gsa-out}; mkdir -p "$OUT"
PARTIAL=${PARTIAL:-tuned_configs/$ARCH.partial.yaml}
BUDGET=${BUDGET:-480}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
case "$what" in
  sweep)
    resume=()
    if [ -f "$PARTIAL" ]; then resume=(--resume "$PARTIAL"); fi
    python3 -m tuning.sweep --arch "$ARCH" --output "$OUT/$ARCH.yaml" "${resume[@]}" \
      --time-budget "$BUDGET" "$@" 2>&1 | tee "$OUT/sweep.log"
    exit "${PIPESTATUS[0]}"
    ;;
  first-call)
    modes=${1:-yaml,autotune}
    python3 -m tuning.first_call --shape a --modes "$modes" --timeout "${TIMEOUT:-540}" \
      --json "$OUT/first_call.json" 2>&1 | tee "$OUT/first_call.log"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "usage: bash tuning/run_slice.sh sweep|first-call [args]" >&2
    exit 2
    ;;
esac
