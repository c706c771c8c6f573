#!/usr/bin/env bash
# The GPU check of issue 11 (docs/benchmarks.md, "GPU check"): training step
# fused vs per-branch (224 px, batch 64/128, AMP fp16), an AMP search with EMA
# and a forced shrink (memory before/after), inference of AtomNAS-A vs
# MobileNetV2; one table, under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh              # needs CUDA; fails at once without
#   bash benchmarks/gpu_check.sh --cpu-smoke  # same code, tiny sizes, on a CPU
#   bash benchmarks/gpu_check.sh --parts train inference   # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
smoke=0
for arg in "$@"; do [ "$arg" = "--cpu-smoke" ] && smoke=1; done
if [ "$smoke" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check.sh: error: no CUDA device (torch.cuda.is_available() is False with $PY);" \
       "--cpu-smoke runs the same code on the CPU at tiny sizes" >&2
  exit 2
fi
# 7.5 minutes at most on the GPU, so that the whole check fits in 8
exec timeout --signal=INT --kill-after=15 "${GPU_CHECK_TIMEOUT:-450}" \
  "$PY" -W ignore benchmarks/gpu_check.py "$@"
