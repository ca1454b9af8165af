"""Tokenyard's simulator against Vidur 0.0.26 on Vidur's own configurations (an independent check).

For each run in ../shared/data/perf/vidur_reference/vidur_0.0.26_latency_runs.csv
(Llama-2-7B on A100-80GB, TP1, block 16, batch cap 128; vLLM scheduling with a 4,096-token
budget or Sarathi with 512-token chunks; Poisson arrivals at the given QPS; prompt / output
lengths from the Azure conversation trace or Vidur's arXiv-summarisation trace, prompts cut
so that prompt + output <= 4,096 as Vidur's length generator does), simulates the same
workload with Tokenyard (same seeded lengths and arrivals for every row of one trace) and
prints TTFT / TPOT / E2E p50 and p90 side by side with their ratio Tokenyard / Vidur, then the
saturation rate of one replica (completed requests per second under overload, Vidur's
`req_per_s_sim` at 8 QPS).

Tokenyard's engine core always schedules like vLLM V1 (decodes first, then prefill chunks up
to the token budget, mixed in one step); Vidur's "vllm" scheduler runs prefill-only steps.
`--factors FILE` runs Tokenyard with another factors file (e.g. the pre-i10 one in
bench/data/perf_factors_before_i10.json).

    python bench/sim_vs_vidur.py [--requests 2000] [--factors FILE]
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from sim.calibrate import default_data_dir
from sim.cluster import parse_cluster
from sim.simulator import simulate
from sim.workload import TraceRequest

MAX_TOKENS = 4096
METRICS = ("TTFT", "TPOT", "E2E")


def length_pool(data_dir: Path, lengths: str) -> list[tuple[int, int]]:
    """(prompt, output) pairs of a Vidur length trace, cut to MAX_TOKENS like Vidur does."""
    if lengths.startswith("splitwise_conv"):
        path = data_dir / "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
        columns = ("ContextTokens", "GeneratedTokens")
    else:
        path = data_dir / "perf/vidur/processed_traces/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"
        columns = ("num_prefill_tokens", "num_decode_tokens")
    pairs = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            prompt, output = int(float(row[columns[0]])), max(1, int(float(row[columns[1]])))
            output = min(output, MAX_TOKENS - 1)
            pairs.append((max(1, min(prompt, MAX_TOKENS - output)), output))
    return pairs


def workload(pairs: Sequence[tuple[int, int]], qps: float, count: int, seed: int) -> list[TraceRequest]:
    rng = random.Random(seed)
    t = 0.0
    requests = []
    for i in range(count):
        t += rng.expovariate(qps)
        prompt, output = pairs[rng.randrange(len(pairs))]
        requests.append(TraceRequest(f"r{i}", t, prompt, output))
    return requests


def cluster_for(replicas: int, scheduler: str, factors: str | None) -> object:
    budget = 512 if scheduler == "sarathi" else 4096
    pool: dict[str, object] = {
        "name": "a100", "gpu": "A100-80GB", "model": "llama-2-7b", "count": replicas,
        "engine": {"max_num_seqs": 128, "max_num_batched_tokens": budget, "block_size": 16,
                   "enable_prefix_caching": False},
    }
    doc: dict[str, object] = {"default_model": "llama-2-7b", "pools": [pool], "dispatch": {"picker": "round_robin"}}
    cluster = parse_cluster(doc, "sim_vs_vidur")
    if factors:
        from scheduler.engine_model import load_factors_file
        from sim.cluster import with_factors

        cluster = with_factors(cluster, load_factors_file(factors))
    return cluster


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_row(row: dict[str, str], data_dir: Path, count: int, factors: str | None) -> dict[str, float]:
    pairs = length_pool(data_dir, row["lengths"])
    requests = workload(pairs, float(row["QPS"]), count, seed=1)
    result = simulate(cluster_for(int(row["replicas"]), row["scheduler"], factors), requests)  # type: ignore[arg-type]
    done = [r for r in result.records if not r.rejected and r.finish_s is not None]
    values = {
        "TTFT": [r.ttft_s for r in done if r.ttft_s is not None],
        "TPOT": [r.tpot_s for r in done if r.tpot_s is not None],
        "E2E": [r.e2e_s for r in done if r.e2e_s is not None],
    }
    out = {f"{m}_p{q}": percentile(values[m], q / 100) for m in METRICS for q in (50, 90)}
    span = max(r.finish_s or 0.0 for r in done) - min(r.arrival_s for r in done)
    out["req_per_s"] = len(done) / span if span > 0 else math.nan
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--requests", type=int, default=2000, help="requests per run (Vidur ran 10,000)")
    parser.add_argument("--factors", help="a factors file for Tokenyard's engine model")
    args = parser.parse_args()
    reference = args.data / "perf/vidur_reference/vidur_0.0.26_latency_runs.csv"
    with reference.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["lengths"] != "splitwise_conv_x3"]  # x3: speed repeats
    header = f"{'lengths':<10} {'rep':>3} {'sched':<7} {'QPS':>4}"
    for metric in METRICS:
        header += f" | {metric + ' p50 ty/vidur':>22} {'p90 ty/vidur':>20}"
    lines = [header]
    for row in tqdm(rows, desc="runs", file=sys.stderr):
        ours = run_row(row, args.data, args.requests, args.factors)
        line = f"{row['lengths'][:10]:<10} {row['replicas']:>3} {row['scheduler']:<7} {row['QPS']:>4}"
        for metric in METRICS:
            for q in (50, 90):
                theirs = float(row[f"{metric}_p{q}"])
                mine = ours[f"{metric}_p{q}"]
                width = 14 if q == 50 else 12
                line += (" |" if q == 50 else "") + f" {mine * 1e3:>{width - 7}.0f}/{theirs * 1e3:<6.0f}{mine / theirs:>5.2f}x"
        line += f" | {ours['req_per_s']:.2f} vs {float(row['req_per_s_sim']):.2f} req/s"
        lines.append(line)
        tqdm.write(line, file=sys.stderr)
    print("Tokenyard vs Vidur 0.0.26 (ms: tokenyard/vidur and the ratio; last column: completed req/s)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
