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
# pip byte-compiles what it installs one file at a time (over half of a fresh install: ~100 s
# on 2 cores); compileall does it on every core. Byte-compiled here, not left to first use:
# with PYTHONDONTWRITEBYTECODE set (as on some CI images) every process, each Ray worker
# included, would compile jax, ray, torch... from source again (a test run took 2.5x as long).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]' 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
# Files that are not Python 3 (templates, test data) fail to compile, as they do under pip.
.venv/bin/python -m compileall -q -j 0 .venv/lib/python3*/site-packages > /dev/null || true
test -x .venv/bin/mis-score
