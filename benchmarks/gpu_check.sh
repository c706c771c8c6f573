#!/usr/bin/env bash
# The GPU check of issue 11 (docs/benchmarks.md, "GPU check"): training step
# fused vs per-branch (224 px, batch 64/128, AMP fp16), an AMP search with EMA
# and a forced shrink (memory before/after), inference of AtomNAS-A vs
# MobileNetV2; one table, under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh              # needs CUDA; fails at once without
#   bash benchmarks/gpu_check.sh --cpu-smoke  # same code, tiny sizes, on a CPU
#   bash benchmarks/gpu_check.sh --parts train inference   # a subset
#   bash benchmarks/gpu_check.sh --parts deploy            # issue 21's row only
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
# Parts: gpu_check.py's (train, search, inference) and deploy (bench_deploy.py).
args=() deploy=1 parts_given=0 in_parts=0 py_parts=()
for arg in "$@"; do
  case "$arg" in
    --parts) parts_given=1 in_parts=1 deploy=0 ;;
    --*) in_parts=0; args+=("$arg") ;;
    deploy) [ "$in_parts" = 1 ] && deploy=1 || args+=("$arg") ;;
    *) if [ "$in_parts" = 1 ]; then py_parts+=("$arg"); else args+=("$arg"); fi ;;
  esac
done
rc=0
if [ "$parts_given" = 0 ] || [ "${#py_parts[@]}" -gt 0 ]; then
  [ "${#py_parts[@]}" -gt 0 ] && args+=(--parts "${py_parts[@]}")
  # 6.5 minutes at most on the GPU, so that the whole check fits in 8
  timeout --signal=INT --kill-after=15 "${GPU_CHECK_TIMEOUT:-390}" \
    "$PY" -W ignore benchmarks/gpu_check.py "${args[@]}" || rc=$?
fi
if [ "$deploy" = 1 ]; then
  if [ "$smoke" = 1 ]; then
    deploy_args=(--device cpu --batches 1 --reps 1 --zoo atomnas_a --widths 1.0 --forms)
  else
    deploy_args=(--device cuda --reps 5 --zoo atomnas_a --widths 1.0 --forms)
  fi
  timeout --signal=INT --kill-after=15 "${GPU_DEPLOY_TIMEOUT:-75}" \
    "$PY" -W ignore benchmarks/bench_deploy.py "${deploy_args[@]}" || rc=$?
fi
exit "$rc"
