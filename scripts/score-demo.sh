#!/usr/bin/env bash
# Offline demo: sets up .venv, writes a RANDOM-WEIGHT qwen3-tiny checkpoint, scores
# examples/requests.jsonl with the engine (no Ray) and prints the responses.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu
ckpt=${MIS_DEMO_CKPT:-${XDG_CACHE_HOME:-$HOME/.cache}/mis-serve/qwen3-tiny}
[ -f "$ckpt/config.json" ] || .venv/bin/mis-score make-checkpoint --preset qwen3-tiny --out "$ckpt"
.venv/bin/mis-score score --model-path "$ckpt" --mode prefix \
  --input examples/requests.jsonl --output /tmp/mis-score-demo.jsonl
cat /tmp/mis-score-demo.jsonl
