"""The planned mixed fleet against the best single-GPU-type fleet, live (issue 12).

For one point of bench/planner_melange.py's setting (workload, TPOT SLO, rate; llama-2-7b
over Mélange's four GPU types), this plans and verifies in the simulator the Tokenyard mix
and every single-type fleet, keeps the mix and the cheapest verified single type, writes
both as `tokenyard plan --out` files, and runs each through `tokenyard up --plan` (one
emulated engine process per planned instance, the router dispatching by the plan's routing
table, the file store; all on 127.0.0.1). Each fleet gets the same seeded open-loop Poisson
stream of real streamed HTTP completions whose prompt and answer lengths are drawn from the
workload (prompt: that many pseudo-tokens; answer: exactly that many, through the emulated
engine's `x-tokenyard-output-tokens`), and reports cost per hour, SLO attainment (the share
of requests answered within both TTFT and TPOT, the rule the planner verifies with), and the
share of requests each pool served against the plan's.

`--time-scale S` slows every engine S times (fewer tokens per second for the 2-core box's
router and client to carry); arrivals are then S times sparser and the SLO thresholds S
times longer, which is the same system in slow motion.

    python bench/planner_up.py --workload arena-like --tpot-ms 120 --rate 2 --requests 150 --time-scale 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.loopback_load import offer_poisson, start_up, stop_up  # noqa: E402
from bench.planner_melange import INPUT_EDGES, MELANGE_GPUS, OUTPUT_EDGES, workloads  # noqa: E402

MODEL = "llama-2-7b"
MAX_REQUESTS = 2000
REQUEST_TIMEOUT_S = 600.0


def plans(name: str, tpot_ms: float, ttft_ms: float, rate: float, cache_dir: str) -> dict[str, Any]:
    """The verified mix and the cheapest verified single type, as `tokenyard plan --out` documents."""
    import dataclasses

    from scheduler.catalog import default_catalog
    from scheduler.planner.problem import PlanError
    from scheduler.planner.routing import table_from_plan
    from scheduler.types import SloClass
    from sim.capacity import CapacityCache
    from sim.plan_run import plan_and_verify
    from sim.plan_workload import PlanInputs, Workload

    catalog = default_catalog()
    requests = workloads(2000)[name]
    workload = Workload.from_requests(requests, INPUT_EDGES, OUTPUT_EDGES)
    gpus = tuple(catalog.gpu(g) for g in MELANGE_GPUS)
    base = PlanInputs(catalog, catalog.model(MODEL), gpus, (1,), {"default": SloClass("default", ttft_ms, tpot_ms)},
                      0.95)
    cache = CapacityCache(cache_dir)
    out: dict[str, Any] = {}
    for fleet, fleet_gpus in [("mix", gpus), *[(g.name, (g,)) for g in gpus]]:
        try:
            verified = plan_and_verify(workload, requests, rate, dataclasses.replace(base, gpus=fleet_gpus), cache)
        except PlanError as exc:
            print(f"{fleet}: no plan ({str(exc)[:100]})", flush=True)
            continue
        if not verified.accepted:
            print(f"{fleet}: not verified ({verified.attainment})", flush=True)
            continue
        doc = verified.plan.as_dict()
        doc["cost"] = round(verified.plan.usd_per_hour, 6)
        doc["rate_rps"] = rate
        doc["routing"] = {"default": table_from_plan(verified.plan, workload.input_edges, workload.output_edges,
                                                     "default").as_dict()}
        doc["verified"] = {"attainment": verified.attainment, "plans_tried": verified.tries}
        out[fleet] = doc
        print(f"{fleet}: ${doc['cost']:.2f}/h {verified.plan.instances()} sim attainment "
              f"{verified.attainment['default']:.4f}", flush=True)
    singles = {k: v for k, v in out.items() if k != "mix"}
    if "mix" not in out or not singles:
        raise SystemExit("no verified mix or no verified single-type fleet at this point")
    best = min(singles, key=lambda k: singles[k]["cost"])
    return {"mix": out["mix"], "best_single": out[best], "best_single_gpu": best,
            "requests": [(r.input_tokens, r.output_tokens) for r in requests]}


async def one(client: httpx.AsyncClient, url: str, n_in: int, n_out: int, out: list[dict[str, Any]]) -> None:
    body = {"model": MODEL, "prompt": " ".join(["tok"] * n_in) + " ", "max_tokens": n_out, "stream": True}
    start = time.monotonic()
    first = None
    chunks = 0
    row: dict[str, Any] = {"input": n_in, "output": n_out}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body,
                                 headers={"x-tokenyard-output-tokens": str(n_out)}) as response:
            row["status"] = response.status_code
            row["instance"] = response.headers.get("x-tokenyard-instance", "")
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks += 1
                    if first is None:
                        first = time.monotonic()
    except httpx.HTTPError as exc:
        row["status"] = type(exc).__name__
    end = time.monotonic()
    if row.get("status") == 200 and first is not None:
        row["ttft_s"] = first - start
        row["tpot_s"] = (end - first) / max(1, chunks - 1)
        row["chunks"] = chunks
    out.append(row)


def run_fleet(label: str, plan: dict[str, Any], pairs: list[tuple[int, int]], args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="planner_up_"))
    plan_path = state / "plan.json"
    plan_path.write_text(json.dumps(plan))
    try:
        proc, url, log = start_up(["--state-dir", str(state / "up"), "--time-scale", str(args.time_scale),
                                   "--admission", "off", "--plan", str(plan_path), "--plan-model", MODEL],
                                  state / "up.log", MODEL, timeout_s=180, log_tail_chars=1500)
        try:
            time.sleep(2.0)  # the router's first load reports from every engine
            rows, span_s = asyncio.run(offer_poisson(
                pairs, args.rate / args.time_scale, args.seed,
                lambda client, pair, out: one(client, url, pair[0], pair[1], out),
                timeout_s=REQUEST_TIMEOUT_S, max_connections=1000))
        finally:
            stop_up(proc, log)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    ttft_slo, tpot_slo = args.ttft_ms / 1e3 * args.time_scale, args.tpot_ms / 1e3 * args.time_scale
    done = [r for r in rows if "ttft_s" in r]
    met = [r for r in done if r["ttft_s"] <= ttft_slo and r["tpot_s"] <= tpot_slo]
    statuses: dict[str, int] = {}
    by_pool: dict[str, int] = {}
    for r in rows:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        if r.get("instance"):
            pool = r["instance"].rsplit("-", 1)[0]
            by_pool[pool] = by_pool.get(pool, 0) + 1
    # The share of these requests the plan's table sends to each pool (its rows: the
    # router looks a request up by its prompt length; weighted rows are split by a hash).
    import bisect

    table = plan["routing"]["default"]
    rows_by_input = {row["input"]: row["pools"] for row in table["rows"]}
    planned: dict[str, float] = {}
    for n_in, _ in pairs:
        weights = rows_by_input.get(bisect.bisect_right(table["input_edges"], n_in) - 1, {})
        total = sum(weights.values()) or 1.0
        for pool, weight in weights.items():
            planned[pool] = planned.get(pool, 0.0) + weight / total / len(pairs)

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else math.nan

    scale = args.time_scale
    return {
        "fleet": label, "usd_per_hour": plan["cost"], "instances": {p["name"]: p["instances"] for p in plan["pools"]},
        "offered": len(rows), "statuses": statuses, "attainment": round(len(met) / len(rows), 4),
        "sim_attainment": round(plan["verified"]["attainment"]["default"], 4),
        "p50_ttft_ms": round(pct([r["ttft_s"] for r in done], 0.5) * 1e3 / scale, 1),
        "p99_ttft_ms": round(pct([r["ttft_s"] for r in done], 0.99) * 1e3 / scale, 1),
        "p50_tpot_ms": round(pct([r["tpot_s"] for r in done], 0.5) * 1e3 / scale, 1),
        "p95_tpot_ms": round(pct([r["tpot_s"] for r in done], 0.95) * 1e3 / scale, 1),
        "served_share": {k: round(v / len(rows), 3) for k, v in sorted(by_pool.items())},
        "planned_share": {k: round(v, 3) for k, v in sorted(planned.items())},
        "span_s": round(span_s, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="arena-like", choices=["arena-like", "pubmed-like", "mixed"])
    parser.add_argument("--tpot-ms", type=float, default=120.0)
    parser.add_argument("--ttft-ms", type=float, default=5000.0)
    parser.add_argument("--rate", type=float, default=2.0, help="the planned rate, req/s (before --time-scale)")
    parser.add_argument("--requests", type=int, default=150, help="requests per fleet")
    parser.add_argument("--time-scale", type=float, default=2.0, help="engines S times slower, arrivals S times sparser")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "tokenyard" / "capacity"))
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = parser.parse_args()
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests: expected 1..{MAX_REQUESTS}")
    if not 0 < args.rate <= 64 or not 0.5 <= args.time_scale <= 20:
        parser.error("--rate: expected (0, 64] req/s; --time-scale: expected 0.5..20")
    chosen = plans(args.workload, args.tpot_ms, args.ttft_ms, args.rate, args.cache_dir)
    rng = random.Random(args.seed)
    pairs = [chosen["requests"][rng.randrange(len(chosen["requests"]))] for _ in range(args.requests)]
    results = [run_fleet("Tokenyard mix", chosen["mix"], pairs, args),
               run_fleet(f"{chosen['best_single_gpu']} only", chosen["best_single"], pairs, args)]
    mix, single = results
    doc = {"workload": args.workload, "tpot_ms": args.tpot_ms, "ttft_ms": args.ttft_ms, "rate_rps": args.rate,
           "requests": args.requests, "time_scale": args.time_scale, "seed": args.seed, "fleets": results,
           "saving": round(1 - mix["usd_per_hour"] / single["usd_per_hour"], 4)}
    print(json.dumps(doc, indent=1))
    print("\n| fleet | $/h | instances | live attainment | sim attainment | p50 / p99 TTFT ms | p50 / p95 TPOT ms |"
          " served share (planned) |\n|---|---:|---|---:|---:|---:|---:|---|")
    for r in results:
        shares = ", ".join(f"{k} {v:.2f} ({r['planned_share'].get(k, 0):.2f})" for k, v in r["served_share"].items())
        print(f"| {r['fleet']} | {r['usd_per_hour']:.2f} | {r['instances']} | {r['attainment']:.3f} | "
              f"{r['sim_attainment']:.3f} | {r['p50_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | "
              f"{r['p50_tpot_ms']:.0f} / {r['p95_tpot_ms']:.0f} | {shares} |")
    print(f"\nsaving of the mix vs the best single type: {doc['saving']:.1%}; statuses "
          + "; ".join(f"{r['fleet']}: {r['statuses']}" for r in results))
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
