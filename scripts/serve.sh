#!/usr/bin/env bash
# The main job: sets up .venv, then `serve run configs/config.yaml` (Ctrl-C stops it).
# Another config: `bash scripts/serve.sh configs/gpu.yaml`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}  # Ray 2.60 turns token auth on by default
exec .venv/bin/serve run "${1:-configs/config.yaml}"
