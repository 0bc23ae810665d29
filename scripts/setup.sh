#!/usr/bin/env bash
# Creates .venv (Python >= 3.11) and installs mis-serve with its dev extras into it.
# Idempotent: a second run only checks that everything is installed. Source it or run it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "mis-serve needs Python >= 3.11"'
  "$PYTHON" -m venv .venv
fi
# --no-compile: pip byte-compiles every module it installs, one at a time (about a minute for
# jax, torch, ray and transformers); Python compiles the ones a process imports on first use
# instead, and keeps them unless PYTHONDONTWRITEBYTECODE is set (scripts/test.sh and
# scripts/serve.sh clear it).
.venv/bin/python -m pip install --no-compile --quiet --disable-pip-version-check -e '.[dev]' 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
test -x .venv/bin/mis-score
