#!/usr/bin/env bash
# Headless Locust against a running deployment for a bounded time; writes CSV + HTML and prints
# a one-line summary. Usage:
#   bash loadtests/run_locust.sh [HOST] [USERS] [SECONDS] [OUT_DIR]
# Workload: MIS_QUERY_TOKENS, MIS_ITEMS, MIS_ITEM_TOKENS, MIS_LABELS (defaults: 2000, 500, 20).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
host=${1:-http://127.0.0.1:8000}
users=${2:-4}
seconds=${3:-60}
out=${4:-loadtests/out}
mkdir -p "$out"
.venv/bin/locust -f loadtests/locustfile.py --headless --host "$host" -u "$users" -r "$users" \
  -t "${seconds}s" --stop-timeout 120 --csv "$out/locust" --html "$out/locust.html" \
  --only-summary --loglevel WARNING || true  # exits 1 when any request failed; summary says
.venv/bin/python -m loadtests.summary "$out/locust_stats.csv" --items "${MIS_ITEMS:-500}" \
  --duration-s "$seconds" --json "$out/summary.json"
