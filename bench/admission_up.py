"""The overload scenario at small scale through `tokenyard up`: admission on vs off.

Starts `tokenyard up` (three emulated engine processes, the router, the file store) with
`--admission off`, then `on`, engines slowed by `--time-scale`, and offers the same
open-loop Poisson load (seeded) to llama-3-8b (two engines: A100-80GB and H100-80GB) above
what they serve: streamed chat completions of `--max-tokens` tokens, as the anonymous
tenant (class interactive: TTFT 1 s, TPOT 100 ms). Per run: answers by status, p50/p99
TTFT and p50 TPOT of the answered, and goodput (answers that met both targets per second
of offered load). Everything is on 127.0.0.1 and bounded by `--duration-s`.

    python bench/admission_up.py                          # ~2 minutes
    python bench/admission_up.py --rate 40 --duration-s 20 --time-scale 4

Prints a Markdown table and writes docs/img/admission_up.png.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.loopback_load import offer_poisson, start_up, stop_up  # noqa: E402

TTFT_SLO_S, TPOT_SLO_S = 1.0, 0.1


async def one(client: httpx.AsyncClient, url: str, max_tokens: int, out: list[dict[str, Any]]) -> None:
    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "Tell me about GPUs " * 20}],
            "max_tokens": max_tokens, "stream": True}
    start = time.monotonic()
    first = None
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            status = response.status_code
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks += 1
                    if first is None:
                        first = time.monotonic()
    except httpx.HTTPError as exc:
        out.append({"status": type(exc).__name__})
        return
    end = time.monotonic()
    row: dict[str, Any] = {"status": status}
    if status == 200 and first is not None:
        row["ttft_s"] = first - start
        row["tpot_s"] = (end - first) / max(1, chunks - 1)
    out.append(row)


def run(admission: str, args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix=f"admission_up_{admission}_"))
    try:
        proc, url, log = start_up(["--state-dir", str(state), "--time-scale", str(args.time_scale),
                                   "--admission", admission], state / "up.log", "llama-3-8b")
        try:
            rows, _ = asyncio.run(offer_poisson(
                itertools.repeat(None), args.rate, args.seed,
                lambda client, _item, out: one(client, url, args.max_tokens, out),
                timeout_s=120.0, duration_s=args.duration_s))
        finally:
            stop_up(proc, log)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    answered = [r for r in rows if "ttft_s" in r]
    ttft = sorted(r["ttft_s"] for r in answered)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    good = sum(1 for r in answered if r["ttft_s"] <= TTFT_SLO_S and r["tpot_s"] <= TPOT_SLO_S)
    return {
        "label": f"admission {admission}", "offered": len(rows), "statuses": statuses,
        "p50_ttft_s": statistics.median(ttft) if ttft else float("nan"),
        "p99_ttft_s": ttft[int(0.99 * (len(ttft) - 1))] if ttft else float("nan"),
        "p50_tpot_s": statistics.median(r["tpot_s"] for r in answered) if answered else float("nan"),
        "good": good, "goodput_rps": good / args.duration_s,
    }


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    labels = [r["label"] for r in rows]
    colors = ["tab:gray", "tab:blue"]
    axes[0].bar(labels, [r["p99_ttft_s"] for r in rows], color=colors)
    axes[0].set_title("p99 TTFT of answered (s)")
    axes[1].bar(labels, [r["p50_tpot_s"] * 1000 for r in rows], color=colors)
    axes[1].set_title("p50 TPOT of answered (ms)")
    axes[2].bar(labels, [r["goodput_rps"] for r in rows], color=colors)
    axes[2].set_title("goodput (req/s meeting TTFT 1 s and TPOT 100 ms)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=24.0, help="offered requests per second")
    parser.add_argument("--duration-s", type=float, default=20.0, help="seconds of offered load per run")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--time-scale", type=float, default=4.0, help="slows the emulated engines (tokenyard up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "docs" / "img" / "admission_up.png"))
    args = parser.parse_args()
    from tqdm import tqdm

    rows = []
    for admission in tqdm(["off", "on"], desc="tokenyard up runs", unit="run"):
        rows.append(run(admission, args))
    print(f"\n`tokenyard up --time-scale {args.time_scale:g}`, Poisson {args.rate:g} req/s for {args.duration_s:g} s, "
          f"{args.max_tokens} tokens each, to llama-3-8b (A100 + H100 emulated)\n")
    print("| admission | offered | answered by status | p50 TTFT s | p99 TTFT s | p50 TPOT ms | goodput req/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        print(f"| {r['label']} | {r['offered']} | {statuses} | {r['p50_ttft_s']:.2f} | {r['p99_ttft_s']:.2f} "
              f"| {r['p50_tpot_s'] * 1000:.0f} | {r['goodput_rps']:.2f} |")
    plot(rows, Path(args.out), f"tokenyard up, {args.rate:g} req/s offered, time scale {args.time_scale:g}")
    print(f"\nplot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
