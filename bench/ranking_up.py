"""Learned-rank vs FCFS release order of the router's admission queue, live through
`tokenyard up`, with real HTTP requests whose answer lengths are known.

Starts `tokenyard up` once per policy (three emulated engine processes, the router, the file
store; everything on 127.0.0.1): `--queue-sort slo_priority` (all requests are in one class,
so: arrival order = FCFS), then `learned_rank` with the starvation guard, then `learned_rank`
without it (`--rank-max-wait-s` of an hour). Each run offers the same seeded open-loop
Poisson load of streamed chat completions to llama-3-8b (two engines: A100-80GB and
H100-80GB). When both are saturated (32 outstanding requests each, `tokenyard up`'s
document) the router holds requests and releases them in the policy's order.

The prompts: the AlpacaEval prompts that `tokenyard train rank`'s split holds out, each
with the real length of Meta-Llama-3-8B-Instruct's answer (Tekken tokens) times
`--length-scale`, which the emulated engine produces exactly (header
`x-tokenyard-output-tokens`, passed through by the router); `max_tokens` is the same for
all (`--max-tokens`), so it tells the ranker nothing. Or `--prompts FILE`: JSONL of
`{"prompt": ..., "output_tokens": N}`. The ranker is `--rank-model`, one trained without
those prompts (`tokenyard train rank --no-refit`); the shipped default has seen them.

    python bench/ranking_up.py --rank-model split.json.gz             # ~4 minutes
    python bench/ranking_up.py --rank-model split.json.gz --rate 6 --requests 200

Per run: answers by status, mean and p90 end-to-end latency, p99 TTFT, and throughput.
Prints a Markdown table and writes docs/img/ranking_up.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
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

GENERATOR = "Meta-Llama-3-8B-Instruct"
MAX_PROMPTS = 10_000
REQUEST_TIMEOUT_S = 300.0


def alpaca_prompts(data: Path) -> list[dict[str, Any]]:
    """Held-out AlpacaEval prompts with the real token length of GENERATOR's answer."""
    from learn.rank import TrainConfig, split_by_prompt
    from learn.rank_data import TokenCounter, alpaca_text_examples

    examples, _ = alpaca_text_examples(data / "lengths" / "alpaca_eval", TokenCounter())
    split = split_by_prompt(examples, TrainConfig())
    return [{"prompt": e.features.instruction_text, "output_tokens": e.output_tokens}
            for e in split.test + split.unseen if e.model == GENERATOR]


def read_prompts(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if len(rows) >= MAX_PROMPTS:
                raise ValueError(f"{path}: more than {MAX_PROMPTS} prompts")
            row = json.loads(line)
            tokens = row.get("output_tokens") if isinstance(row, dict) else None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or \
                    not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
                raise ValueError(f"{path}:{number}: expected {{\"prompt\": str, \"output_tokens\": int >= 1}}")
            rows.append({"prompt": row["prompt"], "output_tokens": tokens})
    return rows


async def one(client: httpx.AsyncClient, url: str, item: dict[str, Any], max_tokens: int,
              out: list[dict[str, Any]]) -> None:
    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": item["prompt"]}],
            "max_tokens": max_tokens, "stream": True}
    headers = {"x-tokenyard-output-tokens": str(item["tokens"])}
    start = time.monotonic()
    first = None
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
            status = response.status_code
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks += 1
                    if first is None:
                        first = time.monotonic()
    except httpx.HTTPError as exc:
        out.append({"status": type(exc).__name__, "tokens": item["tokens"]})
        return
    row: dict[str, Any] = {"status": status, "tokens": item["tokens"]}
    if status == 200 and first is not None:
        row["ttft_s"] = first - start
        row["e2e_s"] = time.monotonic() - start
    out.append(row)


def run(label: str, extra: list[str], items: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="ranking_up_"))
    try:
        proc, url, log = start_up(["--state-dir", str(state), "--time-scale", str(args.time_scale), *extra],
                                  state / "up.log", "llama-3-8b")
        try:
            rows, span_s = asyncio.run(offer_poisson(
                items, args.rate, args.seed, lambda client, item, out: one(client, url, item, args.max_tokens, out),
                timeout_s=REQUEST_TIMEOUT_S))
        finally:
            stop_up(proc, log)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    done = [r for r in rows if "e2e_s" in r]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    e2e = sorted(r["e2e_s"] for r in done)
    ttft = sorted(r["ttft_s"] for r in done)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else math.nan

    return {
        "label": label, "offered": len(rows), "statuses": statuses,
        "mean_e2e_s": statistics.fmean(e2e) if e2e else math.nan, "p90_e2e_s": pct(e2e, 0.9),
        "mean_ttft_s": statistics.fmean(ttft) if ttft else math.nan, "p99_ttft_s": pct(ttft, 0.99),
        "max_ttft_s": ttft[-1] if ttft else math.nan, "throughput_rps": len(done) / span_s,
    }


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    labels = [r["label"] for r in rows]
    colors = ["tab:gray", "tab:blue", "tab:orange"][: len(rows)]
    for ax, key, name in ((axes[0], "mean_e2e_s", "mean E2E (s)"), (axes[1], "p90_e2e_s", "p90 E2E (s)"),
                          (axes[2], "p99_ttft_s", "p99 TTFT (s)")):
        ax.bar(labels, [r[key] for r in rows], color=colors)
        ax.set_title(name)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--prompts", type=Path, default=None, help="JSONL {prompt, output_tokens} instead of AlpacaEval")
    parser.add_argument("--rank-model", type=Path, default=None, help="ranker not trained on these prompts")
    parser.add_argument("--requests", type=int, default=240, help="requests per run (prompts repeat, shuffled)")
    parser.add_argument("--rate", type=float, default=8.0, help="offered requests per second (Poisson)")
    parser.add_argument("--length-scale", type=float, default=0.25, help="answer length = known length x this")
    parser.add_argument("--max-tokens", type=int, default=2048, help="max_tokens of every request")
    parser.add_argument("--time-scale", type=float, default=2.0, help="slows the emulated engines (tokenyard up)")
    parser.add_argument("--guard-s", type=float, default=30.0, help="learned_rank starvation guard max_wait_s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "ranking_up.png")
    args = parser.parse_args()
    if not 1 <= args.requests <= MAX_PROMPTS or not 0 < args.rate <= 1000 or not 0 < args.length_scale <= 1:
        parser.error("--requests in [1, 10000], --rate in (0, 1000], --length-scale in (0, 1] are required")
    if args.prompts is None and args.rank_model is None:
        parser.error("--rank-model: the shipped ranker was trained on these prompts; pass one trained with "
                     "`tokenyard train rank --no-refit` (or --prompts with your own set)")
    from tqdm import tqdm

    base = read_prompts(args.prompts) if args.prompts else alpaca_prompts(args.data)
    rng = random.Random(args.seed)
    items = [dict(rng.choice(base)) for _ in range(args.requests)]
    for item in items:
        item["tokens"] = max(1, min(args.max_tokens, round(item["output_tokens"] * args.length_scale)))
    rank = ["--rank-model", str(args.rank_model)] if args.rank_model else []
    plan = [("FCFS (slo_priority, one class)", ["--queue-sort", "slo_priority"]),
            (f"learned rank + guard {args.guard_s:g}s",
             ["--queue-sort", "learned_rank", "--rank-max-wait-s", str(args.guard_s), *rank]),
            ("learned rank, no guard", ["--queue-sort", "learned_rank", "--rank-max-wait-s", "3600", *rank])]
    rows = [run(label, extra, items, args) for label, extra in tqdm(plan, desc="tokenyard up runs", unit="run")]
    mean_tokens = statistics.fmean(i["tokens"] for i in items)
    print(f"\n`tokenyard up --time-scale {args.time_scale:g}`, {args.requests} streamed requests, Poisson "
          f"{args.rate:g} req/s, answer lengths known (mean {mean_tokens:.0f} tokens, x{args.length_scale:g} of the "
          f"real ones), to llama-3-8b (A100 + H100 emulated)\n")
    print("| release order | offered | by status | mean E2E s | p90 E2E s | mean TTFT s | p99 TTFT s | max TTFT s "
          "| req/s | FCFS / policy (mean E2E) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        print(f"| {r['label']} | {r['offered']} | {statuses} | {r['mean_e2e_s']:.2f} | {r['p90_e2e_s']:.2f} | "
              f"{r['mean_ttft_s']:.2f} | {r['p99_ttft_s']:.2f} | {r['max_ttft_s']:.2f} | {r['throughput_rps']:.2f} | "
              f"{rows[0]['mean_e2e_s'] / r['mean_e2e_s']:.2f} |")
    plot(rows, args.out, f"tokenyard up: admission-queue release order, {args.rate:g} req/s, known answer lengths")
    print(f"\nplot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
