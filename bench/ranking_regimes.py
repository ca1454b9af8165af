"""Where shortest-predicted-first pays: FCFS, input-length SJF, learned-rank SJF with and
without the starvation guard, and the oracle, in three simulated setups where queueing
(not decode time) is a larger share of end-to-end latency, at 50/80/95% load.

    python bench/ranking_regimes.py [--requests 2000] [--tau 0.37] [--rank-model split.json.gz]

Setups (llama-3-8b on A100-80GB, Azure conversation trace lengths unless said):

- `batch8`: one engine capped at 8 running sequences (`max_num_seqs 8`), ordering its own
  waiting queue by the policy's vLLM `priority` (`--scheduling-policy priority`);
- `kv-limited`: one engine (max_num_seqs 64) whose KV cache holds 1,500 blocks of 16 tokens
  (~17 average Azure conversations), so memory, not the sequence cap, limits the batch and
  long requests hold memory (and get preempted); engine priority as in `batch8`;
- `fleet-admission`: four engines (max_num_seqs 64) behind the router's admission queue,
  an instance saturated at 8 outstanding requests (`admission.saturation.
  max_outstanding_per_instance: 8`, a TPOT cap): requests beyond that wait in the router,
  which releases them in `queue.sort` order; engines run FCFS;
- `alpaca-batch8`, `alpaca-fleet`: `batch8` and `fleet-admission` with real prompts and real output lengths: the
  AlpacaEval prompts that `tokenyard train rank`'s split holds out, with the answers of
  its 11 text models (tokens by the Tekken tokenizer), Poisson arrivals (seeded), each request
  scored by a ranker trained without those prompts (`--rank-model`, a `--no-refit` model);
  its learned rows use that ranker, not the noise model.
- `v1-a100`, `v1-a10g`, `v1-a10g-fleet`: vLLM V1's defaults (`V1_ENGINE`: 256 seats, 2,048
  batched tokens, KV from GPU memory) on one A100-80GB (seat-limited), one A10G (2,633 KV
  blocks: KV-limited) and four A10G behind the admission queue (saturated at
  `V1_FLEET_QUEUED` requests waiting in an engine); engines order by the policy's priority.

Predictions elsewhere come from `sim.rank_noise` at `--tau` (the ranker's held-out tau);
the oracle is tau = 1. Load = arrival rate over the capacity of the same setup under FCFS,
measured in the same run (every request offered at 200 req/s: completed requests per
second); 150% is a burst over capacity that drains when the finite trace ends. Writes a table, a
JSON file (`--json`) and docs/img/ranking_regimes.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ranking import metrics, rate_per_s, scaled  # noqa: E402
from sim.cluster import parse_cluster  # noqa: E402
from sim.rank_noise import InputLengthRanker, NoisyRanker, RankFn, noise_sd_for_tau  # noqa: E402
from sim.simulator import simulate  # noqa: E402
from sim.traces import read_trace  # noqa: E402
from sim.workload import TraceRequest  # noqa: E402

SHARED_DATA_DEFAULT = Path(os.environ.get("TOKENYARD_SHARED_DATA", ROOT.parent / "shared" / "data"))  # as tests/conftest.py
TRACE = "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
LOADS = (0.5, 0.8, 0.95, 1.5)  # 1.5: a burst over capacity (the trace is finite, so it drains)
OVERLOAD_RPS = 200.0
KV_LIMITED_BLOCKS = 1500
GUARD_SWEEP_LOAD = 0.95
GUARD_SWEEP_S: tuple[float | None, ...] = (15.0, 30.0, 60.0, 120.0, 240.0, None)
SETUPS = ("batch8", "kv-limited", "fleet-admission", "alpaca-batch8", "alpaca-fleet", "v1-a100", "v1-a10g", "v1-a10g-fleet")
# vLLM V1's own defaults for an OpenAI-compatible server on these GPUs (max_num_seqs 256,
# max_num_batched_tokens 2048, gpu_memory_utilization 0.9, KV blocks from the memory left
# after the weights), its admission (no preemption to admit), `--scheduling-policy priority`
V1_ENGINE: dict[str, Any] = {"max_num_seqs": 256, "max_num_batched_tokens": 2048, "gpu_memory_utilization": 0.9}
V1_GPU = {"v1-a100": "A100-80GB", "v1-a10g": "A10G", "v1-a10g-fleet": "A10G"}
V1_FLEET_QUEUED = 5  # the router holds a request once every instance has this many waiting


def cluster(setup: str, policy: Any, admit_preemption: bool = False) -> Any:
    """The setup's cluster with `policy` as the engine priority (batch8) or the admission
    queue's sort (the fleets). `admit_preemption`: engines that order by priority preempt
    a lower-priority running request to admit a waiting one (vLLM V0's priority
    scheduler; the engine option `admit_preemption`); default vLLM V1's admission."""
    if setup.startswith("v1-"):
        return _v1_cluster(setup, policy)
    batch8 = setup.endswith("batch8")
    engine: dict[str, Any] = {"max_num_seqs": 8 if batch8 else 64, "max_num_batched_tokens": 4096}
    if setup == "kv-limited":  # 1,500 blocks of 16 tokens: ~17 Azure conversations (1,420 tokens each)
        engine["num_kv_blocks"] = KV_LIMITED_BLOCKS
    engine_queue = batch8 or setup == "kv-limited"
    if admit_preemption and engine_queue and policy != "fcfs":
        engine["admit_preemption"] = True  # FCFS rows: no priorities, so nothing to preempt for
    count = 1 if engine_queue else 4
    document: dict[str, Any] = {
        "version": 1,
        "profiles": {"default": {"scorers": ["least_outstanding"], "picker": "max_score"}},
        "affinity": {"enabled": False},
    }
    if engine_queue:
        document["queue"] = {"sort": "fcfs", "engine_priority": policy}
    else:
        document["queue"] = {"sort": policy, "engine_priority": "fcfs"}
        document["admission"] = {
            "enabled": True, "max_queue_depth": 100_000, "default_queue_timeout_ms": 3_600_000,
            "saturation": {"max_queued_per_instance": None, "max_outstanding_per_instance": 8},
        }
    return parse_cluster({
        "default_model": "llama-3-8b",
        "pools": [{"name": "a100", "gpu": "A100-80GB", "model": "llama-3-8b", "count": count, "engine": engine}],
        "policy": document,
    }, f"bench/ranking_regimes.py {setup}")


def _v1_cluster(setup: str, policy: Any) -> Any:
    """vLLM V1 defaults (`V1_ENGINE`) on one engine, or four behind the router's admission
    queue: an instance is saturated once `V1_FLEET_QUEUED` requests wait in its engine (a
    queue-depth signal, as llm-d's saturation detector), then requests wait in the router,
    released in `queue.sort` order; engines order their own queues by the same rank."""
    fleet = setup.endswith("fleet")
    document: dict[str, Any] = {
        "version": 1,
        "profiles": {"default": {"scorers": ["least_outstanding"], "picker": "max_score"}},
        "affinity": {"enabled": False},
        "queue": {"sort": policy if fleet else "fcfs", "engine_priority": policy},
    }
    if fleet:
        document["admission"] = {
            "enabled": True, "max_queue_depth": 100_000, "default_queue_timeout_ms": 3_600_000,
            "saturation": {"max_queued_per_instance": V1_FLEET_QUEUED, "max_outstanding_per_instance": None},
        }
    return parse_cluster({
        "default_model": "llama-3-8b",
        "pools": [{"name": "v1", "gpu": V1_GPU[setup], "model": "llama-3-8b", "count": 4 if fleet else 1,
                   "engine": dict(V1_ENGINE)}],
        "policy": document,
    }, f"bench/ranking_regimes.py {setup}")


def policies(noise_sd: float, guard_s: float, learned: RankFn | None) -> list[tuple[str, Any, RankFn | None]]:
    model_rank: RankFn = learned if learned is not None else NoisyRanker(noise_sd)
    return [
        ("fcfs", "fcfs", None),
        ("input-length SJF", {"input_length": {}}, InputLengthRanker()),
        ("learned SJF", {"learned_rank": {"max_wait_s": None}}, model_rank),
        (f"learned SJF + guard {guard_s:g}s", {"learned_rank": {"max_wait_s": guard_s}}, model_rank),
        ("oracle SJF", {"learned_rank": {"max_wait_s": None}}, NoisyRanker(0.0)),
    ]


def alpaca_requests(data: Path, seed: int) -> tuple[list[TraceRequest], dict[str, str]]:
    """Held-out AlpacaEval prompts x the 11 text models' real answer lengths, shuffled, at 1 req/s
    (Poisson; `scaled` sets the rate); also each request's generator (the model that wrote
    the answer), which the ranker is told."""
    from learn.rank import TrainConfig, split_by_prompt
    from learn.rank_data import TokenCounter, alpaca_text_examples

    counter = TokenCounter()
    examples, _ = alpaca_text_examples(data / "lengths" / "alpaca_eval", counter)
    split = split_by_prompt(examples, TrainConfig())  # the same split as `tokenyard train rank`
    held = split.test + split.unseen
    rng = random.Random(seed)
    rng.shuffle(held)
    input_tokens = {e.prompt_key: counter.count(e.features.instruction_text) for e in held}
    out: list[TraceRequest] = []
    generators: dict[str, str] = {}
    clock = 0.0
    for i, e in enumerate(held):
        clock += rng.expovariate(1.0)
        out.append(TraceRequest(f"alpaca-{i}", clock, max(1, input_tokens[e.prompt_key]), max(1, e.output_tokens),
                                prompt=e.features.instruction_text))
        generators[f"alpaca-{i}"] = e.model
    return out, generators


class GeneratorRanker:
    """The real ranker for the alpaca setups: scores the prompt as a request to the model that
    wrote the answer (the simulated engines all run llama-3-8b's timing)."""

    def __init__(self, model_path: Path | None, generators: dict[str, str]) -> None:
        from scheduler.predictors.rank import load_rank_model

        self.model = load_rank_model(model_path)
        self.generators = generators
        self.cache: dict[str, float] = {}

    def __call__(self, trace: TraceRequest) -> float:
        score = self.cache.get(trace.request_id)
        if score is None:
            record = {"prompt": trace.prompt or "", "model": self.generators.get(trace.request_id, ""), "input_tokens": trace.input_tokens}
            score = self.cache[trace.request_id] = float(self.model.score(record))
        return score


def run_setup(setup: str, args: argparse.Namespace, bar: Any) -> dict[str, Any]:
    learned: RankFn | None = None
    if setup.startswith("alpaca"):
        requests, generators = alpaca_requests(args.data, args.seed)
        learned = GeneratorRanker(args.rank_model, generators)
        from scipy.stats import kendalltau

        scores = {r.request_id: learned(r) for r in requests}
        tau = float(kendalltau([scores[r.request_id] for r in requests], [r.output_tokens for r in requests]).statistic)
        # what one model's queue sees: tau among the requests each generator answered (the
        # mixed tau above also counts the model prior, which a single-model engine gets nothing from)
        by_model: dict[str, list[TraceRequest]] = {}
        for r in requests:
            by_model.setdefault(generators[r.request_id], []).append(r)
        within = [float(kendalltau([scores[r.request_id] for r in rs], [r.output_tokens for r in rs]).statistic)
                  for rs in by_model.values() if len(rs) > 9]
        within_tau = float(np.mean(within)) if within else math.nan
    else:
        requests = read_trace(args.data / TRACE, limit=args.requests).requests()
        tau = within_tau = args.tau
    outputs = [r.output_tokens for r in requests]
    sd = noise_sd_for_tau(outputs, tau, seed=0)
    # capacity: every request offered within seconds (200 req/s), FCFS; completions per second
    admit = args.admit_preemption
    capacity = metrics(simulate(cluster(setup, "fcfs", admit), scaled(requests, OVERLOAD_RPS / rate_per_s(requests))))
    cap_rps = capacity["throughput_rps"]
    rows: list[dict[str, Any]] = []
    for load in LOADS:
        trace = scaled(requests, load * cap_rps / rate_per_s(requests))
        for name, policy, ranker in policies(sd, args.guard_s, learned):
            result = simulate(cluster(setup, policy, admit), trace, ranker=ranker)
            rows.append({"load": load, "policy": name, **metrics(result)})
            bar.update(1)
    # the guard's trade: mean gain against the worst wait, at 95% load, per max_wait_s
    trace = scaled(requests, GUARD_SWEEP_LOAD * cap_rps / rate_per_s(requests))
    model_rank: RankFn = learned if learned is not None else NoisyRanker(sd)
    guard_sweep = []
    for guard in GUARD_SWEEP_S:
        result = simulate(cluster(setup, {"learned_rank": {"max_wait_s": guard}}, admit), trace, ranker=model_rank)
        guard_sweep.append({"max_wait_s": guard, **metrics(result)})
        bar.update(1)
    out_mean = float(np.mean(outputs))
    out_cv = float(np.std(outputs) / out_mean)
    return {"setup": setup, "requests": len(requests), "capacity_rps": cap_rps, "tau": round(tau, 3), "within_model_tau": round(within_tau, 3),
            "noise_sd": sd, "guard_sweep": guard_sweep, "output_mean": out_mean, "output_cv": out_cv, "rows": rows}


def print_tables(doc: dict[str, Any]) -> None:
    for block in doc["setups"]:
        print(f"\n{block['setup']}: {block['requests']} requests, output tokens mean {block['output_mean']:.0f} "
              f"(CV {block['output_cv']:.2f}); capacity {block['capacity_rps']:.2f} req/s; learned rank at tau "
              f"{block['tau']} (within one model's requests: {block.get('within_model_tau', block['tau'])})")
        print("| load | policy | mean E2E s | p90 E2E s | mean TTFT s | mean decode s | p99 TTFT s | max TTFT s | req/s |"
              " FCFS / policy | oracle / policy | norm. latency ms/token | FCFS / policy (norm.) | no-wait bound |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        fcfs = {r["load"]: r for r in block["rows"] if r["policy"] == "fcfs"}
        oracle = {r["load"]: r["mean_e2e_s"] for r in block["rows"] if r["policy"] == "oracle SJF"}
        for r in block["rows"]:
            f = fcfs[r["load"]]
            # no queue order can beat FCFS by more than this on mean E2E: it removes every wait and
            # leaves decode (the time after the first token), which order does not change
            bound = f["mean_e2e_s"] / max(1e-9, f["mean_decode_s"])
            print(f"| {r['load']:.2f} | {r['policy']} | {r['mean_e2e_s']:.2f} | {r['p90_e2e_s']:.2f} | "
                  f"{r['mean_ttft_s']:.2f} | {r['mean_decode_s']:.2f} | {r['p99_ttft_s']:.2f} | {r['max_ttft_s']:.1f} | "
                  f"{r['throughput_rps']:.2f} | {f['mean_e2e_s'] / r['mean_e2e_s']:.2f} | "
                  f"{oracle[r['load']] / r['mean_e2e_s']:.2f} | {1000 * r['mean_norm_latency_s']:.1f} | "
                  f"{f['mean_norm_latency_s'] / r['mean_norm_latency_s']:.2f} | {bound:.2f} |")
        f = fcfs[GUARD_SWEEP_LOAD]
        print(f"guard sweep at {GUARD_SWEEP_LOAD:.0%} load (FCFS max TTFT {f['max_ttft_s']:.0f} s): max_wait_s -> "
              "FCFS / learned mean E2E, normalized, max TTFT s")
        for g in block["guard_sweep"]:
            label = "none" if g["max_wait_s"] is None else f"{g['max_wait_s']:g}"
            print(f"  {label:>5}: {f['mean_e2e_s'] / g['mean_e2e_s']:.2f}x, {f['mean_norm_latency_s'] / g['mean_norm_latency_s']:.2f}x, "
                  f"{g['max_ttft_s']:.0f}")


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = doc["setups"]
    fig, axes = plt.subplots(3, len(setups), figsize=(5 * len(setups), 11), squeeze=False)
    for col, block in enumerate(setups):
        names = list(dict.fromkeys(r["policy"] for r in block["rows"]))
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            rows = [r for r in block["rows"] if r["policy"] == name]
            x = np.arange(len(rows)) + k * width
            axes[0][col].bar(x, [r["mean_e2e_s"] for r in rows], width, label=name)
            axes[1][col].bar(x, [r["p99_ttft_s"] for r in rows], width, label=name)
            axes[2][col].bar(x, [1000 * r.get("mean_norm_latency_s", math.nan) for r in rows], width, label=name)
        for row, title in ((0, "mean E2E (s, log)"), (1, "p99 TTFT (s, log)"), (2, "mean E2E / output token (ms, log)")):
            ax = axes[row][col]
            ax.set_xticks(np.arange(len(LOADS)) + 0.4 - width / 2, [f"{int(load * 100)}%" for load in LOADS])
            ax.set_title(f"{block['setup']}: {title}", fontsize=9)
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Shortest-predicted-first vs FCFS, simulated llama-3-8b on A100 (bench/ranking_regimes.py)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED_DATA_DEFAULT)
    parser.add_argument("--requests", type=int, default=2000, help="Azure conv requests (batch8, fleet-admission)")
    parser.add_argument("--tau", type=float, default=0.37,
                        help="Kendall tau of the predictions; default: the shipped ranker's held-out tau per batch of "
                        "one model's requests (0.372), what one engine's queue sees (0.489 overall also counts the "
                        "model prior, which ranks models, not one model's requests)")
    parser.add_argument("--guard-s", type=float, default=60.0, help="starvation guard max_wait_s")
    parser.add_argument("--rank-model", type=Path, default=None,
                        help="ranker for the alpaca setups: one trained with --no-refit (it has not seen the held-out prompts)")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--admit-preemption", action="store_true",
                        help="engines that order by priority preempt a lower-priority running request to admit a "
                             "waiting one (vLLM V0's priority scheduler; the engine core's default until it became an "
                             "option); default: vLLM V1's admission, which never preempts to admit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "ranking_regimes.png")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--replot", type=Path, default=None, help="redraw the plot from a --json file and exit")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.out)
        return 0
    setups = [s for s in args.setups.split(",") if s]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        parser.error(f"--setups: unknown {unknown}; known: {', '.join(SETUPS)}")
    if any(s.startswith("alpaca") for s in setups) and args.rank_model is None:
        parser.error("--rank-model: the alpaca setups need a ranker that has not seen the held-out prompts "
                     "(tokenyard train rank --no-refit --out split.json.gz)")
    doc: dict[str, Any] = {"guard_s": args.guard_s, "admit_preemption": args.admit_preemption, "setups": []}
    with tqdm(total=len(setups) * (len(LOADS) * 5 + len(GUARD_SWEEP_S)), desc="ranking regimes", unit="run", file=sys.stderr) as bar:
        for setup in setups:
            doc["setups"].append(run_setup(setup, args, bar))
    print_tables(doc)
    plot(doc, args.out)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    print(f"\nplot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
