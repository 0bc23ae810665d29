#!/usr/bin/env bash
# On a GPU host, what CI cannot run, in one command (README: Accelerators): the Pallas kernel's
# tests natively; attention alone, XLA against the kernel and a sweep of its settings; and the
# engine's modes on the reference workload (random-weight qwen3-0.6b, bf16) with XLA and with
# the kernel, each with its MFU against the matmul peak measured in the same run.
#   bash scripts/gpu-check.sh [OUT_DIR]    (default gpu-check/: each step's JSON and table)
# Needs the CUDA build of JAX: bash scripts/setup.sh && .venv/bin/pip install -e '.[cuda]'.
# Every step runs; the exit status is 1 when any of them failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-gpu-check}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
export JAX_PLATFORMS=cuda
status=0
step() {  # step NAME COMMAND...: run it, keep its output in $out/NAME.txt
  local name=$1
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.txt" || { status=1; echo "== $name FAILED"; }
}
step kernel-tests "$py" -m pytest -n 0 -p no:cacheprovider \
  tests/test_ragged_attention.py tests/test_block_attention.py
for mode in prefix packed; do
  step "attention-$mode" "$py" -m loadtests.bench_attention --mode "$mode" \
    --json "$out/attention-$mode.json"
done
for attention in xla pallas; do
  step "bench-$attention" "$py" -m mis_score bench --preset qwen3-0.6b --dtype bfloat16 \
    --modes serial,packed-segment,prefix --chunk-sizes 64 256 500 --attention "$attention" \
    --max-batch-tokens 16384 --no-transformers --json "$out/bench-$attention.json"
done
echo "== results in $out/ (status $status)"
exit $status
