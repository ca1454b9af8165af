"""Per-round throughput and CPU ratios of one target to another, from bench/router_overhead.py's JSON.

Within a round of bench/router_overhead.py the targets of one point (mode, concurrency) run
back to back, so each round gives one paired ratio; on a shared machine the median of those
and their spread say more than one ratio of medians.

    python bench/router_overhead.py --peers vllm-router --no-uvicorn --workers 1 --native \\
        --rounds 7 --json /tmp/ro.json
    python bench/router_ratios.py /tmp/ro.json --target tokenyard-native --baseline vllm-router
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def ratios(report: dict, target: str, baseline: str, key: str) -> dict[tuple[str, str], list[float]]:
    """Per (mode, concurrency): target / baseline of `key`, one value per round both answered."""
    rounds = report["per_round"]
    out: dict[tuple[str, str], list[float]] = {}
    for mode, by_c in rounds.get(target, {}).items():
        for c, rows in by_c.items():
            base_rows = rounds.get(baseline, {}).get(mode, {}).get(c, [])
            values = []
            for mine, theirs in zip(rows, base_rows, strict=False):
                if key in mine and key in theirs and theirs[key] and "error" not in mine and "error" not in theirs:
                    values.append(mine[key] / theirs[key])
            out[(mode, c)] = values
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--target", default="tokenyard-native")
    parser.add_argument("--baseline", default="vllm-router")
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    if "per_round" not in report:
        print(f"{args.report}: no per_round rows (written by an older bench/router_overhead.py)", file=sys.stderr)
        return 2
    print(f"| {args.target} / {args.baseline} | rounds | req/s ratio: median | min | max "
          "| CPU/request ratio: median |")
    print("|---|---:|---:|---:|---:|---:|")
    rps = ratios(report, args.target, args.baseline, "rps")
    cpu = ratios(report, args.target, args.baseline, "cpu_us_per_request")
    for (mode, c), values in rps.items():
        if not values:
            print(f"| {mode}, c={c} | 0 | | | | |")
            continue
        cpu_values = cpu.get((mode, c)) or [float("nan")]
        print(f"| {mode}, c={c} | {len(values)} | {statistics.median(values):.2f}x | {min(values):.2f}x "
              f"| {max(values):.2f}x | {statistics.median(cpu_values):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
