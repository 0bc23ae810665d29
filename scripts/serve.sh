#!/usr/bin/env bash
# The main job: sets up .venv, then `serve run configs/config.yaml` (Ctrl-C stops it).
# Another config: `bash scripts/serve.sh configs/gpu.yaml`; any `serve run` arguments, e.g.
# `bash scripts/serve.sh serve_app.app:build_app model.path=DIR engine.mode=prefix`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# Ray's own settings (configs/serve.env: HAProxy, gRPC, auth): each one not already set.
while IFS='=' read -r key value || [[ -n $key ]]; do
  [[ $key =~ ^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*$ ]] || continue  # comments
  key=${BASH_REMATCH[1]}
  [[ -n ${!key+x} ]] || export "$key=${value%$'\r'}"
done < configs/serve.env
unset PYTHONDONTWRITEBYTECODE  # keep compiled modules: every replica imports jax (setup.sh)
exec .venv/bin/serve run "${@:-configs/config.yaml}"
