#!/usr/bin/env bash
# The project's GPU check: every Triton-language kernel on CUDA against its torch path, with
# timings, then the served runners with their modules on CUDA against the CPU (gpu_serving),
# then unified on the GPU against the FAISS chain on a CPU thread, in process (gpu_vs_chain;
# needs faiss). Run on a GPU host (the Dockerfile image, or a lent machine) from the
# repository root:
#   bash benchmarks/gpu_check.sh            # full sizes (1M items / 1M slots)
#   bash benchmarks/gpu_check.sh --small    # quick sizes
# On a CPU-only machine: `SMOKE=1 bash benchmarks/gpu_check.sh` runs the same scripts under
# TRITON_INTERPRET=1 on tiny shapes (checks the code paths, not the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
args=("$@")
if [ "${SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  args=(--interpret --small)
fi
status=0
# the compiled CPU ops (the CPU side of every comparison runs them)
"$PY" kernels/build_ext.py --quiet || status=1
for check in gpu_bloom gpu_ann gpu_zch; do
  echo "=== benchmarks/$check.py ${args[*]:-}"
  if ! PYTHONUNBUFFERED=1 "$PY" "benchmarks/$check.py" "${args[@]}"; then
    echo "!!! $check failed"
    status=1
  fi
done
serving_args=()
[ "${SMOKE:-0}" = 1 ] && serving_args=(--device cpu --items 4000 --per-kind 4)
echo "=== benchmarks/gpu_serving.py ${serving_args[*]:-}"
if ! PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_serving.py "${serving_args[@]}"; then
  echo "!!! gpu_serving failed"
  status=1
fi
if [ "${SMOKE:-0}" = 1 ]; then
  chain_args=(--device cpu --num-items 4000 --requests 32 --batches 1,16 --recall-queries 2)
else
  chain_args=()
fi
echo "=== benchmarks/gpu_vs_chain.py ${chain_args[*]:-}"
if ! PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_vs_chain.py "${chain_args[@]}"; then
  echo "!!! gpu_vs_chain failed"
  status=1
fi
exit $status
