"""Tier routing, offline and simulated: what the learned tier predictor buys.

1. Offline: the held-out metrics of `learn.tier.evaluate` (RouteLLM's APGR, CPT(50%),
   CPT(80%), RouterBench's AIQ; random router APGR 0.5) by prompt, by task and by benchmark.
2. Simulated: the Azure conversation trace's arrivals and token counts with held-out
   prompts attached (each prompt's p_small_ok comes from a model that never saw its task:
   the by-task out-of-fold scores), replayed on a two-tier cluster (small: qwen2.5-1.5b on
   L4, large: llama-3-8b on A100-80GB) at normal load and with a 2x burst, for
   always-large, always-small, quality-only, load-aware and random-offload routing.
   Reported per run: TTFT and both-SLO attainment, share of large calls, expected quality
   (mean held-out score of the tier that answered), its loss against always-large, and
   compute cost (tokens x active parameters of the model that served them, against
   always-large).
3. Predictor quality (`--noise-aucs`): the same bursty arrivals without prompts, scored by
   the simulator's tier noise model (sim/tier_noise.py) at each ROC AUC, load-aware
   against random offloading; quality from the noise model's hidden labels.

    nice -n 10 python bench/tiers.py [--window-s 900] [--start-s 0] [--seed 0] [--large 2] [--small 4]
        [--noise-aucs 0.5 0.7 0.9] [--json out.json]

Quality and cost are ratios against always-large measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from learn.tier import TrainParams, evaluate, threshold_table  # noqa: E402
from learn.tier_data import LabelledPrompt, read_any  # noqa: E402
from scheduler.catalog import default_catalog  # noqa: E402
from scheduler.tiers import ThresholdPoint, build_tier_router  # noqa: E402
from sim.cluster import parse_cluster  # noqa: E402
from sim.report import summarize  # noqa: E402
from sim.simulator import simulate  # noqa: E402
from sim.tier_noise import TierNoise  # noqa: E402
from sim.tier_noise import quality as noise_quality  # noqa: E402
from sim.tier_scores import tier_scorer  # noqa: E402
from sim.tier_trace import ScoredPrompt, burst, quality, with_prompts  # noqa: E402
from sim.traces import read_trace  # noqa: E402

SHARED = Path(os.environ.get("TOKENYARD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
POLICIES = ("always_large", "always_small", "quality_only", "load_aware", "random_offload")
SMALL_MODEL, LARGE_MODEL = "qwen2.5-1.5b", "llama-3-8b"
ACTIVE_PARAMS = {name: default_catalog().model(name).active_params for name in (SMALL_MODEL, LARGE_MODEL)}


def cluster_doc(small: int, large: int) -> dict[str, Any]:
    engine = {"max_num_seqs": 128, "max_num_batched_tokens": 8192, "block_size": 16}
    return {
        "default_model": LARGE_MODEL,
        "pools": [
            {"name": "small", "gpu": "L4", "model": SMALL_MODEL, "count": small, "engine": engine},
            {"name": "large", "gpu": "A100-80GB", "model": LARGE_MODEL, "count": large, "engine": engine},
        ],
        "dispatch": {"filters": ["model", "healthy", "not_draining", "not_cordoned"], "scorers": ["least_outstanding"],
                     "picker": "max_score"},
        "slo_classes": {"default": {"ttft_ms": 2000, "tpot_ms": 200, "priority": 1}},
    }


def tier_doc(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"alias": "auto", "small_model": SMALL_MODEL, "large_model": LARGE_MODEL, "policy": policy,
            "default": {"quality_target": args.target, "quality_floor": args.floor},
            "pressure": {"start": args.pressure_start, "full": args.pressure_full,
                         "tpot": False if args.no_tpot_pressure else {"start": args.tpot_start, "full": args.tpot_full}}}


def balanced_prompts(rows: list[LabelledPrompt], scores: np.ndarray, per_benchmark: int, seed: int) -> list[ScoredPrompt]:
    """Up to `per_benchmark` prompts of each benchmark (so none dominates the trace)."""
    rng = np.random.default_rng(seed)
    out = []
    for benchmark in sorted({r.benchmark for r in rows}):
        idx = [i for i, r in enumerate(rows) if r.benchmark == benchmark]
        for i in rng.permutation(idx)[:per_benchmark]:
            out.append(ScoredPrompt(rows[i].prompt, float(scores[i]), rows[i].q_small, rows[i].q_large))
    return out


def run_scenario(name: str, cluster: Any, requests: list[Any], scored: dict[str, ScoredPrompt],
                 table: list[ThresholdPoint], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for policy in args.policies:
        router = build_tier_router(tier_doc(policy, args), table)
        wall = time.perf_counter()
        result = simulate(cluster, requests, tier_router=router, seed=args.seed)
        summary = summarize(result, cluster.slo_classes)
        served = {r.request_id: r.model for r in result.records if not r.rejected}
        # Compute cost: tokens x active parameters of the model that served them (FLOPs
        # per token scale with it; GPU busy time does not, a batching engine is "busy"
        # with one request as with a hundred).
        compute = sum((r.input_tokens + r.output_tokens) * ACTIVE_PARAMS[r.model]
                      for r in result.records if not r.rejected)
        slo = summary["slo"]["default"]
        # Requests that met their TTFT but not their TPOT, by the tier that served them:
        # the tier decision reads predicted TTFT only, so these are what it cannot see.
        tpot_only = {model: sum(1 for r in result.records if not r.rejected and r.model == model
                                and r.ttft_met and not r.tpot_met) for model in (SMALL_MODEL, LARGE_MODEL)}
        rows.append({
            "scenario": name, "policy": policy, "requests": summary["requests"],
            "ttft_attainment": slo["ttft_attainment"], "both_attainment": slo["both_attainment"],
            "ttft_p99_ms": summary["ttft_p99_ms"],
            "large_share": sum(1 for m in served.values() if m == LARGE_MODEL) / max(1, len(served)),
            "quality": quality(served, scored, SMALL_MODEL), "compute": compute,
            "tpot_only_misses_small": tpot_only[SMALL_MODEL], "tpot_only_misses_large": tpot_only[LARGE_MODEL],
            "wall_s": time.perf_counter() - wall,
        })
        print(f"  {name:<8} {policy:<15} done in {rows[-1]['wall_s']:.1f} s", file=sys.stderr)
    base = next((r for r in rows if r["policy"] == "always_large"), rows[0])
    for row in rows:
        row["quality_loss"] = base["quality"] - row["quality"]
        row["cost_ratio"] = row["compute"] / base["compute"] if base["compute"] else float("nan")
    return rows


def run_noise(cluster: Any, requests: list[Any], table: list[ThresholdPoint],
              args: argparse.Namespace) -> list[dict[str, Any]]:
    """Load-aware against random offloading on prompt-less requests, at each noise AUC."""
    bare = [dataclasses.replace(r, prompt=None, p_small_ok=None) for r in requests]
    rows = []
    for auc in args.noise_aucs:
        noise = TierNoise(auc, args.noise_share)
        for policy in ("load_aware", "random_offload"):
            router = build_tier_router(tier_doc(policy, args), table)
            result = simulate(cluster, bare, tier_router=router, seed=args.seed, tier_noise=noise)
            labels = tier_scorer(router, None, noise, args.seed).noisy  # the simulation's own draws
            served = {r.request_id: r.model for r in result.records if not r.rejected}
            slo = summarize(result, cluster.slo_classes)["slo"]["default"]
            rows.append({"auc": auc, "policy": policy, "both_attainment": slo["both_attainment"],
                         "large_share": sum(1 for m in served.values() if m == LARGE_MODEL) / max(1, len(served)),
                         "quality_loss": 1.0 - noise_quality(served, labels, SMALL_MODEL)})
            print(f"  noise auc {auc:<5g} {policy:<15} done", file=sys.stderr)
    return rows


def _median_us(fn: Any, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * float(np.median(times))


def scoring_cost(rows: list[LabelledPrompt], table: list[ThresholdPoint], repeat: int = 300) -> dict[str, float]:
    """Median microseconds of scoring one prompt (packaged model), of one tier decision
    (6 instances), and of one dispatch decision over 16 instances (the baseline: what
    every request already pays), measured here side by side."""
    import random

    from scheduler.dispatch import ClusterView, build_policy
    from scheduler.predictors.tier import load_predictor
    from scheduler.types import InstanceState, RequestInfo

    predictor = load_predictor()
    sample = [r.prompt for r in random.Random(0).sample(rows, 64)]
    cursor = iter(range(10**9))
    score_us = _median_us(lambda: predictor.score(sample[next(cursor) % 64]), repeat)
    instances = [InstanceState(f"i{k}", LARGE_MODEL if k % 2 else SMALL_MODEL, gpu="A100-80GB" if k % 2 else "L4",
                               running=k, waiting=k % 3, kv_blocks_total=10_000) for k in range(16)]
    info = RequestInfo("r", LARGE_MODEL, input_tokens=800, p_small_ok=0.7)
    policy = build_policy(None)
    view = ClusterView(instances)
    dispatch_us = _median_us(lambda: policy.decide(view, info), repeat)
    router = build_tier_router(tier_doc_defaults(), table)
    rng = random.Random(0)
    tier_us = _median_us(lambda: router.decide(info, instances[:6], None, rng), repeat)
    return {"score_us": score_us, "tier_decide_us": tier_us,
            "dispatch_decide_us": dispatch_us}


def tier_doc_defaults() -> dict[str, Any]:
    return {"alias": "auto", "small_model": SMALL_MODEL, "large_model": LARGE_MODEL, "policy": "load_aware",
            "default": {"quality_target": 0.95, "quality_floor": 0.3}}


def print_offline(metrics: dict[str, dict[str, dict[str, float]]]) -> None:
    print("offline, held out (random router APGR 0.5):")
    print(f"  {'split':<13}{'benchmark':<13}{'n':>7}{'APGR':>7}{'CPT50':>7}{'CPT80':>7}{'AIQ':>7}{'AIQ rnd':>8}")
    for split, by in metrics.items():
        for bench, m in by.items():
            print(f"  {split:<13}{bench:<13}{int(m['n']):>7}{m['apgr']:>7.3f}{m['cpt50']:>7.3f}"
                  f"{m['cpt80']:>7.3f}{m['aiq']:>7.3f}{m['random_aiq']:>8.3f}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2), sharey=True)
    markers = dict(zip(POLICIES, "osD^v", strict=True))
    for ax, scenario in zip(axes, ("normal", "burst2x"), strict=True):  # an absent scenario: empty panel
        for row in (r for r in rows if r["scenario"] == scenario):
            ax.scatter(row["quality_loss"], 100 * row["both_attainment"], s=45, marker=markers[row["policy"]],
                       label=f"{row['policy']} (large {row['large_share']:.2f})")
        ax.axhline(99, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{scenario}: SLO attainment vs quality loss")
        ax.set_xlabel("expected quality loss vs always-large (held-out labels)")
        ax.legend(fontsize=7, loc="center right")
    axes[0].set_ylabel("requests meeting TTFT and TPOT SLO (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window-s", type=float, default=900.0, help="seconds of the Azure conversation trace")
    parser.add_argument("--start-s", type=float, default=0.0, help="where in the trace the window starts")
    parser.add_argument("--trace", default=str(SHARED / "traces" / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"),
                        help="arrivals and token counts (any format `tokenyard sim run` reads)")
    parser.add_argument("--rate-scale", type=float, default=1.15, help="normal load: the trace at this rate")
    parser.add_argument("--burst-factor", type=float, default=2.0)
    parser.add_argument("--small", type=int, default=4, help="small-tier instances")
    parser.add_argument("--large", type=int, default=2, help="large-tier instances")
    parser.add_argument("--target", type=float, default=0.95, help="quality target (PGR) at normal load")
    parser.add_argument("--floor", type=float, default=0.3, help="quality floor (PGR) under load")
    parser.add_argument("--pressure-start", type=float, default=0.2, help="x TTFT SLO where offloading starts")
    parser.add_argument("--pressure-full", type=float, default=0.6, help="x TTFT SLO where it reaches the floor")
    parser.add_argument("--tpot-start", type=float, default=0.2,
                        help="x TPOT SLO (predicted from the prefill rate) where offloading starts (the TTFT's multiple)")
    parser.add_argument("--tpot-full", type=float, default=0.6, help="x TPOT SLO where it reaches the floor")
    parser.add_argument("--no-tpot-pressure", action="store_true",
                        help="the decision reads predicted TTFT alone (as before the prefill rate)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--scenarios", nargs="+", default=["normal", "burst2x"], choices=["normal", "burst2x"])
    parser.add_argument("--per-benchmark", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--noise-aucs", type=float, nargs="*", default=[],
                        help="also run the burst without prompts, scored by the tier noise model at these AUCs")
    parser.add_argument("--noise-share", type=float, default=0.5, help="noise model: share of small-ok requests")
    parser.add_argument("--cache", help="keep the held-out scores here between runs (recomputed when absent)")
    parser.add_argument("--plot", default=str(REPO_ROOT / "docs" / "img" / "tier_sim.png"))
    args = parser.parse_args()

    rows: list[LabelledPrompt] = []
    for folder in ("routing", "lengths"):
        rows.extend(read_any(SHARED / folder)[0])
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        cached = json.loads(cache.read_text())
        metrics, oof_scores = cached["metrics"], np.asarray(cached["oof_scores"])
        if len(oof_scores) != len(rows):
            raise SystemExit(f"{cache}: {len(oof_scores)} scores for {len(rows)} prompts; delete it")
    else:
        print(f"evaluating the tier predictor on {len(rows)} prompts ...", file=sys.stderr)
        evaluation = evaluate(rows, TrainParams(seed=args.seed), lambda stage: print(f"  {stage}", file=sys.stderr))
        assert evaluation.oof_scores is not None
        metrics, oof_scores = evaluation.metrics, evaluation.oof_scores
        if cache is not None:
            cache.write_text(json.dumps({"metrics": metrics, "oof_scores": oof_scores.tolist()}))
    table = [ThresholdPoint(**r) for r in threshold_table(rows, oof_scores)]
    print_offline(metrics)

    cost = scoring_cost(rows, table)
    print(f"\nper request (median): score one prompt {cost['score_us']:.0f} us, tier decision {cost['tier_decide_us']:.0f} us; dispatch decision over 16 "
          f"instances {cost['dispatch_decide_us']:.0f} us; score / dispatch = "
          f"{cost['score_us'] / cost['dispatch_decide_us']:.1f}x, tier decision / dispatch = "
          f"{cost['tier_decide_us'] / cost['dispatch_decide_us']:.1f}x")

    prompts = balanced_prompts(rows, oof_scores, args.per_benchmark, args.seed)
    trace_path = Path(args.trace)
    window = (args.start_s, args.start_s + args.window_s * args.burst_factor)
    arrivals = read_trace(trace_path, rate_scale=args.rate_scale, window_s=window)  # arrivals from 0 s
    joined = list(with_prompts(arrivals, prompts, seed=args.seed))
    scored = {req.request_id: p for req, p in joined}
    all_requests = [req for req, _ in joined]
    normal = [r for r in all_requests if r.arrival_s < args.window_s]
    third = args.window_s / 3
    bursty = [r for r in burst(all_requests, args.burst_factor, third, 2 * third) if r.arrival_s < args.window_s]
    cluster = parse_cluster(cluster_doc(args.small, args.large), "bench/tiers.py")
    results = []
    for name, requests in (("normal", normal), ("burst2x", bursty)):
        if name not in args.scenarios:
            continue
        print(f"simulating {name}: {len(requests)} requests", file=sys.stderr)
        results.extend(run_scenario(name, cluster, requests, scored, table, args))

    noise_rows = run_noise(cluster, bursty, table, args) if args.noise_aucs else []
    print(f"\nsimulated: {trace_path.name} {args.window_s:.0f} s from {args.start_s:.0f} s at {args.rate_scale}x, seed {args.seed}, "
          f"{args.burst_factor}x burst in the "
          f"middle third; {args.small} x L4 {SMALL_MODEL} + {args.large} x A100 {LARGE_MODEL}; "
          f"quality target {args.target}, floor {args.floor} (PGR)")
    print(f"  {'scenario':<9}{'policy':<16}{'reqs':>6}{'TTFT ok':>9}{'SLO ok':>8}{'p99 TTFT':>10}"
          f"{'large':>7}{'quality':>9}{'loss':>7}{'cost':>6}  TPOT-only misses small/large")
    for r in results:
        print(f"  {r['scenario']:<9}{r['policy']:<16}{r['requests']:>6}{100 * r['ttft_attainment']:>8.1f}%"
              f"{100 * r['both_attainment']:>7.1f}%{r['ttft_p99_ms']:>9.0f}ms{r['large_share']:>7.2f}"
              f"{r['quality']:>9.3f}{r['quality_loss']:>7.3f}{r['cost_ratio']:>6.2f}"
              f"  {r['tpot_only_misses_small']}/{r['tpot_only_misses_large']}")
    if noise_rows:
        print(f"\npredictor quality: {args.burst_factor}x burst without prompts, tier noise model "
              f"(small-ok share {args.noise_share}); quality loss = share of requests answered small whose label says not ok")
        print(f"  {'AUC':<6}{'policy':<16}{'SLO ok':>8}{'large':>7}{'loss':>7}")
        for r in noise_rows:
            print(f"  {r['auc']:<6g}{r['policy']:<16}{100 * r['both_attainment']:>7.1f}%{r['large_share']:>7.2f}"
                  f"{r['quality_loss']:>7.3f}")
    plot(results, Path(args.plot))
    print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"offline": metrics, "cost_us": cost, "sim": results, "noise": noise_rows,
                                                "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
