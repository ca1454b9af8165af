"""Where the savings gap in Mélange's setting comes from: routing key and per-bucket margins.

Mélange's ILP gives each (input, output) bucket its own GPU mix, which a dispatcher can
only follow if it knows each request's output bucket on arrival; Tokenyard's default
plan (`route_by_input`) splits traffic by the prompt's length alone, what a router sees.
This bench solves the same problems (bench/planner_melange.py's workloads, edges, GPU
types and SLOs; capacities by simulation, cached) both ways, plus each single GPU type,
without verification (solve only: it isolates the planner's formulation from the
simulator replay), and prints each GPU type's per-bucket cost efficiency (req/s per $/h)
for the traffic-carrying buckets, the quantity the mix lives on, with the fluid bound: the
cost per req/s of the best type per bucket in any fraction (no integrality, oracle
routing), which no planner can beat on that capacity table.

`--slo-rule melange` measures capacities by Mélange's profiling rule instead of ours: the
token-weighted mean TPOT of the stream within the SLO (Mélange's gpu-benchmark.py), with
the mean TTFT within `--ttft-ms` as the overload guard (a mean-TPOT rule alone never sees
a queue grow); ours is >= 95% of requests within both TTFT and TPOT. That isolates how
much of the gap is the SLO check.

    nice -n 10 python bench/planner_routing.py --cache-dir /tmp/i12_mcache --out /tmp/i12_routing.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.planner_melange import INPUT_EDGES, MELANGE_GPUS, OUTPUT_EDGES, fluid_bound, workloads  # noqa: E402
from scheduler.planner.problem import PlanError  # noqa: E402


class _MelangeRuleCache:
    """CapacityCache's interface with Mélange's SLO rule (see the module docstring); the
    doubling-then-bisecting search of sim/capacity.py, memoised in this process only."""

    def __init__(self) -> None:
        self.memo: dict[str, Any] = {}

    def get(self, query: Any) -> Any:
        key = query.key()
        if key not in self.memo:
            self.memo[key] = _melange_rule_capacity(query)
        return self.memo[key]


def _melange_rule_capacity(query: Any) -> Any:
    import math

    from sim import capacity as cap
    from sim.simulator import simulate

    def ok(rate: float) -> bool:
        cluster = cap._cluster(query)
        records = [r for r in simulate(cluster, cap._stream(query, rate)).records if r.finish_s is not None]
        if not records:
            return False
        decode = [(r.tpot_s, r.output_tokens - 1) for r in records if r.output_tokens > 1 and r.tpot_s is not None]
        tokens = sum(n for _, n in decode)
        mean_tpot_ms = 1000.0 * sum(t * n for t, n in decode) / tokens if tokens else 0.0
        mean_ttft_ms = 1000.0 * sum(r.ttft_s or 0.0 for r in records) / len(records)
        return bool(mean_tpot_ms <= query.slo.tpot_slo_ms and mean_ttft_ms <= query.slo.ttft_slo_ms)

    # The fit and context checks of sim/capacity.py: an impossible shape is 0 under any rule.
    base = cap.measure(dataclasses.replace(query, stream_requests=1, slo=dataclasses.replace(
        query.slo, ttft_slo_ms=1e-6, tpot_slo_ms=1e-6)))
    if math.isinf(base.unloaded_ttft_ms) or not ok(cap._MIN_RATE_RPS):
        return cap.Capacity(0.0, base.unloaded_ttft_ms, base.unloaded_tpot_ms, "misses the SLO even unloaded")
    good, bad = cap._MIN_RATE_RPS, cap._MIN_RATE_RPS * 2
    while bad <= cap._MAX_RATE_RPS and ok(bad):
        good, bad = bad, bad * 2
    for _ in range(cap._BISECT_STEPS):
        mid = math.sqrt(good * bad)
        good, bad = (mid, bad) if ok(mid) else (good, mid)
    return cap.Capacity(good, base.unloaded_ttft_ms, base.unloaded_tpot_ms)


FINER_INPUT_EDGES = (0, 32, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)
FINER_OUTPUT_EDGES = (0, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 2048)


def run(rates: list[float], tpots_ms: list[float], ttft_ms: float, count: int, cache_dir: str,
        names: list[str], slo_rule: str = "tokenyard",
        edges: tuple[tuple[int, ...], tuple[int, ...]] = (INPUT_EDGES, OUTPUT_EDGES),
        taus: tuple[float, ...] = (1.0, 0.7, 0.49)) -> list[dict[str, Any]]:
    from scheduler.catalog import default_catalog
    from scheduler.planner.predicted import routing_keys
    from scheduler.planner.solver import single_type_plans, solve
    from scheduler.types import SloClass
    from sim.capacity import CapacityCache
    from sim.plan_workload import PlanInputs, Workload, build_problem
    from sim.rank_noise import noise_sd_for_tau

    catalog = default_catalog()
    cache: Any = CapacityCache(cache_dir) if slo_rule == "tokenyard" else _MelangeRuleCache()
    model = catalog.model("llama-2-7b")
    gpus = tuple(catalog.gpu(g) for g in MELANGE_GPUS)
    loads = workloads(count)
    # Predicted-output routing at the predictor qualities `taus` (Kendall's tau of the
    # prediction; 1 = exact), as sim.rank_noise's noise on each workload's own lengths.
    noise_sds = {name: [(tau, 0.0 if tau >= 1 else noise_sd_for_tau([r.output_tokens for r in loads[name]], tau))
                        for tau in taus] for name in names}
    points = []
    for name in names:
        workload = Workload.from_requests(loads[name], *edges)
        for tpot in tpots_ms:
            inputs = PlanInputs(catalog, model, gpus, (1,), {"default": SloClass("default", ttft_ms, tpot)}, 0.95)
            for rate in rates:
                row: dict[str, Any] = {"workload": name, "tpot_ms": tpot, "rate_rps": rate}
                try:
                    by_input, _ = build_problem(workload, rate, inputs, cache)
                except PlanError as exc:
                    row["error"] = str(exc)[:160]
                    points.append(row)
                    continue
                by_cell = dataclasses.replace(by_input, route_by_input=False)
                variants = [("route_by_input", by_input), ("route_by_cell", by_cell)]
                buckets, shapes = workload.buckets(rate)
                for tau, sd in noise_sds[name]:
                    keys = routing_keys(buckets, shapes, workload.output_edges, sd)
                    variants.append((f"route_by_predicted_tau{tau:g}", dataclasses.replace(by_input, routing_keys=keys)))
                for key, problem in variants:
                    plan = solve(problem)
                    row[key] = {"usd_per_hour": round(plan.usd_per_hour, 3), "instances": plan.instances()}
                singles = {g: p.usd_per_hour for g, p in single_type_plans(by_input).items() if not isinstance(p, PlanError)}
                best = min(singles, key=lambda g: singles[g])
                row["singles"] = {g: round(v, 3) for g, v in singles.items()}
                row["best_single"] = best
                for key, _ in variants:
                    row[f"saving_{key}"] = round(1 - row[key]["usd_per_hour"] / singles[best], 4)
                if rate == rates[0]:
                    row["efficiency"] = _efficiency(by_input)
                    row["fluid"] = fluid_bound(by_input)
                print(json.dumps({k: v for k, v in row.items() if k != "efficiency"}), flush=True)
                points.append(row)
    return points


def _efficiency(problem: Any) -> list[dict[str, Any]]:
    """Per bucket with >= 2% of the traffic: req/s per $/h of each GPU type."""
    total = sum(b.rate_rps for b in problem.buckets)
    out = []
    for k, bucket in enumerate(problem.buckets):
        if bucket.rate_rps < 0.02 * total:
            continue
        out.append({"bucket": bucket.label, "share": round(bucket.rate_rps / total, 3),
                    "rps_per_usd_h": {o.gpu: round(o.capacity_rps[k] / o.usd_per_hour, 2) for o in problem.options}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1,4,16")
    parser.add_argument("--tpot-ms", default="120,40")
    parser.add_argument("--ttft-ms", type=float, default=5000.0)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--workloads", default="arena-like,pubmed-like,mixed")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "tokenyard" / "capacity"))
    parser.add_argument("--edges", choices=["melange-bench", "finer"], default="melange-bench",
                        help="bucket edges: bench/planner_melange.py's, or about twice as many")
    parser.add_argument("--slo-rule", choices=["tokenyard", "melange"], default="tokenyard")
    parser.add_argument("--out", default="/tmp/planner_routing.json")
    args = parser.parse_args()
    started = time.perf_counter()
    points = run([float(r) for r in args.rates.split(",")], [float(t) for t in args.tpot_ms.split(",")],
                 args.ttft_ms, args.requests, args.cache_dir, args.workloads.split(","), args.slo_rule,
                 (FINER_INPUT_EDGES, FINER_OUTPUT_EDGES) if args.edges == "finer" else (INPUT_EDGES, OUTPUT_EDGES))
    Path(args.out).write_text(json.dumps({"points": points, "wall_s": round(time.perf_counter() - started, 1)},
                                         indent=1) + "\n")
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
