"""One-line summary of a headless Locust run from its `*_stats.csv`:
requests, failures, items/s, p50/p95/p99 latency."""

from __future__ import annotations

import argparse
import csv
import json


def summarize(stats_csv: str, items_per_request: int, duration_s: float) -> dict[str, float | None]:
    """The run's figures; latency percentiles None when no request finished (Locust: N/A)."""
    with open(stats_csv) as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    ok = int(row["Request Count"]) - int(row["Failure Count"])
    return {
        "requests": int(row["Request Count"]),
        "failures": int(row["Failure Count"]),
        "items_per_s": round(ok * items_per_request / duration_s, 2),
        **{f"p{q}_ms": _ms(row[f"{q}%"]) for q in (50, 95, 99)},
    }


def _ms(value: str) -> float | None:
    return None if value == "N/A" else float(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("stats_csv")
    p.add_argument("--items", type=int, required=True, help="items per request")
    p.add_argument("--duration-s", type=float, required=True)
    p.add_argument("--json", help="also write the summary here")
    a = p.parse_args()
    s = summarize(a.stats_csv, a.items, a.duration_s)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(s, f, indent=2)
    latency = " ".join(
        f"p{q}=" + ("n/a" if (ms := s[f"p{q}_ms"]) is None else f"{ms:.0f}ms") for q in (50, 95, 99)
    )
    print(f"requests={s['requests']} failures={s['failures']} items/s={s['items_per_s']} {latency}")


if __name__ == "__main__":
    main()
