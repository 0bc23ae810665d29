#!/usr/bin/env bash
# The main job: sets up .venv, then `serve run configs/config.yaml` (Ctrl-C stops it).
# Another config: `bash scripts/serve.sh configs/gpu.yaml`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# Ray's own settings (HAProxy, throughput-optimized Serve, auth): each one not already set.
while IFS='=' read -r key value; do
  [[ -z $key || $key == \#* || -n ${!key+x} ]] || export "$key=$value"
done < configs/serve.env
exec .venv/bin/serve run "${1:-configs/config.yaml}"
