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
Two Tokenyard variants run: the packaged factors (or `--factors FILE`, e.g. the pre-i10 one in
bench/data/perf_factors_before_i10.json), and the same with the engine's CPU time set to zero
(`kernels-only`), which is what Vidur models (its profiles are CUDA kernel times).

    python bench/sim_vs_vidur.py [--requests 2000] [--factors FILE]
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from scheduler.engine_model import PerfFactors, fitted_factors, load_factors_file
from sim.calibrate import default_data_dir
from sim.cluster import ClusterSpec, parse_cluster, with_factors
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


CPU_FACTORS = ("iteration_overhead_s", "per_seq_overhead_s", "layer_overhead_s", "sampling_s_per_vocab_seq")


def factor_tables(factors_path: str | None) -> dict[str, dict[str, PerfFactors]]:
    """Tokenyard variants: the factors as packaged (or from --factors), and the same with the
    engine's CPU time removed (`kernels only`: what Vidur models)."""
    table = load_factors_file(factors_path) if factors_path else dict(fitted_factors())
    kernels = {gpu: replace(f, **dict.fromkeys(CPU_FACTORS, 0.0)) for gpu, f in table.items()}
    return {"tokenyard": table, "kernels-only": kernels}


def cluster_for(replicas: int, scheduler: str, table: dict[str, PerfFactors]) -> ClusterSpec:
    budget = 512 if scheduler == "sarathi" else 4096
    pool: dict[str, object] = {
        "name": "a100", "gpu": "A100-80GB", "model": "llama-2-7b", "count": replicas,
        "engine": {"max_num_seqs": 128, "max_num_batched_tokens": budget, "block_size": 16,
                   "enable_prefix_caching": False},
    }
    doc: dict[str, object] = {"default_model": "llama-2-7b", "pools": [pool], "dispatch": {"picker": "round_robin"}}
    return with_factors(parse_cluster(doc, "sim_vs_vidur"), table)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_row(row: dict[str, str], data_dir: Path, count: int, table: dict[str, PerfFactors]) -> dict[str, float]:
    pairs = length_pool(data_dir, row["lengths"])
    requests = workload(pairs, float(row["QPS"]), count, seed=1)
    result = simulate(cluster_for(int(row["replicas"]), row["scheduler"], table), requests)
    done = [r for r in result.records if not r.rejected and r.finish_s is not None]
    values = {
        "TTFT": [r.ttft_s for r in done if r.ttft_s is not None],
        "TPOT": [r.tpot_s for r in done if r.tpot_s is not None],
        "E2E": [r.e2e_s for r in done if r.e2e_s is not None],
    }
    return {f"{m}_p{q}": percentile(values[m], q / 100) for m in METRICS for q in (50, 90)}


def saturation_req_per_s(data_dir: Path, lengths: str, scheduler: str, table: dict[str, PerfFactors],
                         count: int) -> float:
    """Completed requests per second of one replica under overload (arrivals at 20 req/s):
    finishes in the middle 60% of the run over its duration (the queue never empties)."""
    requests = workload(length_pool(data_dir, lengths), 20.0, count, seed=2)
    result = simulate(cluster_for(1, scheduler, table), requests)
    finishes = sorted(r.finish_s for r in result.records if r.finish_s is not None)
    low, high = finishes[len(finishes) // 5], finishes[4 * len(finishes) // 5]
    inside = sum(1 for t in finishes if low <= t <= high)
    return inside / (high - low) if high > low else math.nan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--requests", type=int, default=2000, help="requests per run (Vidur ran 10,000)")
    parser.add_argument("--factors", help="a factors file for Tokenyard's engine model")
    args = parser.parse_args()
    reference = args.data / "perf/vidur_reference/vidur_0.0.26_latency_runs.csv"
    with reference.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["lengths"] != "splitwise_conv_x3"]  # x3: speed repeats
    tables = factor_tables(args.factors)
    print("Tokenyard vs Vidur 0.0.26: ms, and the ratio to Vidur (tokenyard = packaged factors; kernels = the "
          "same without the engine's CPU time)")
    header = f"{'lengths':<8} {'rep':>3} {'sched':<7} {'QPS':>4}"
    for metric in METRICS:
        for q in (50, 90):
            header += f" | {metric + ' p' + str(q) + ' vidur/ty/kern':>24}"
    print(header)
    for row in tqdm(rows, desc="runs", file=sys.stderr):
        ours = {label: run_row(row, args.data, args.requests, table) for label, table in tables.items()}
        line = f"{row['lengths'][:8]:<8} {row['replicas']:>3} {row['scheduler']:<7} {row['QPS']:>4}"
        for metric in METRICS:
            for q in (50, 90):
                key = f"{metric}_p{q}"
                theirs = float(row[key])
                ty, kern = ours["tokenyard"][key], ours["kernels-only"][key]
                line += f" | {theirs * 1e3:>6.0f} {ty / theirs:>5.2f}x {kern / theirs:>5.2f}x"
        print(line, flush=True)
    print()
    print("Saturation of one replica (completed req/s under overload; Vidur: req_per_s_sim at 8 QPS)")
    for row in rows:
        if row["replicas"] != "1" or row["QPS"] != "8":
            continue
        ours = {label: saturation_req_per_s(args.data, row["lengths"], row["scheduler"], table, args.requests)
                for label, table in tables.items()}
        print(f"{row['lengths']:<16} {row['scheduler']:<8} vidur {float(row['req_per_s_sim']):.2f}  "
              f"tokenyard {ours['tokenyard']:.2f}  kernels-only {ours['kernels-only']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
