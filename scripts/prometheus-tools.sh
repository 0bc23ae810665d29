#!/usr/bin/env bash
# Prometheus and promtool from Debian's `prometheus` package, unpacked into .cache/prometheus/
# (no service started, nothing installed system-wide): the dashboard and alert tests run them
# (tests/test_dashboards.py). CI runs this (.ci/run); elsewhere those tests skip without it.
# Idempotent; prints the directory that holds the two binaries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dest=.cache/prometheus
if [ ! -x "$dest/usr/bin/promtool" ] || [ ! -x "$dest/usr/bin/prometheus" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # apt-get download needs the package lists; a fresh machine has none yet.
  (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) \
    || { apt-get update -qq >/dev/null && (cd "$tmp" && apt-get download -q prometheus >/dev/null); }
  mkdir -p "$dest"
  dpkg -x "$tmp"/prometheus_*.deb "$dest"
fi
"$dest/usr/bin/promtool" --version >/dev/null
echo "$PWD/$dest/usr/bin"
