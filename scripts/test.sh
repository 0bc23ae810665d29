#!/usr/bin/env bash
# The test command: sets up .venv, checks lint and formatting, runs the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k isolation`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
unset PYTHONDONTWRITEBYTECODE  # keep compiled modules: every Ray worker imports jax (setup.sh)
export JAX_PLATFORMS=cpu  # Ray settings: configs/serve.env, loaded by tests/conftest.py
exec .venv/bin/python -m pytest "$@"
