"""Planner savings in Mélange's own experimental setting, as closely as our data allows.

Mélange (Griggs et al., 2024) plans Llama-2-7B over L4 ($0.70/h), A10G ($1.01/h),
A100-80GB ($3.67/h) and H100 ($7.52/h) under a TPOT SLO (120 ms, and a tight 40 ms), on
Chatbot Arena (short), PubMed (long) and a mix. We have neither data set; the stand-ins:

- `arena-like`: the 805 AlpacaEval instructions with the output lengths of
  llama-2-7b-chat-hf on them (../shared/data/lengths/alpaca_eval; tokens ~ chars / 4):
  short prompts, chat-length answers, as in Arena;
- `pubmed-like`: Vidur's arXiv-summarisation trace (Llama-2 tokenizer, total <= 4096
  tokens; ../shared/data/perf/vidur/processed_traces): long documents, short summaries,
  the shape of PubMed summarisation;
- `mixed`: 80% arena-like, 20% pubmed-like requests.

Arrivals are Poisson (Mélange's load generator too). Mélange has no TTFT SLO; a TTFT of
`--ttft-ms` (default 5 s) keeps an overloaded capacity stream from counting as met.
Each workload x SLO x rate: the cheapest verified fleet of each single GPU type, the
Tokenyard mix over Mélange's four types, and the mix with our catalog's L40S added (the
type that makes our default-setting savings small). Every plan is verified in the
simulator (plan_and_verify, as bench/planner.py's `fleets`). `--no-l40s` keeps to the
paper's four types. Each point also records `same_table`: the first plan's problem solved
by input, by cell, by Mélange's own slice ILP and as the fluid bound (`same_table`'s
docstring), so what the formulation leaves on the table shows on the same capacities.

    nice -n 10 python bench/planner_melange.py --cache-dir /tmp/i12_mcache --out bench/planner_melange.json
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
DATA = Path(os.environ.get("TOKENYARD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

from scheduler.planner.problem import PlanError  # noqa: E402
from sim.workload import TraceRequest  # noqa: E402

MELANGE_GPUS = ("L4", "A10G", "A100-80GB", "H100-80GB")
CHARS_PER_TOKEN = 4.0
# Finer than the planner's defaults at the short end, where Arena's requests are.
INPUT_EDGES = (0, 64, 256, 1024, 2048, 4096)
OUTPUT_EDGES = (0, 64, 256, 512, 1024)


def arena_like() -> list[tuple[int, int]]:
    root = DATA / "lengths" / "alpaca_eval"
    with (root / "derived_instructions.csv").open() as fh:
        prompts = {row["instruction_id"]: len(row["instruction"]) for row in csv.DictReader(fh)}
    pairs = []
    with (root / "derived_output_lengths_all_models.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["model"] == "llama-2-7b-chat-hf" and row["instruction_id"] in prompts:
                n_in = max(1, round(prompts[row["instruction_id"]] / CHARS_PER_TOKEN))
                n_out = max(1, round(int(row["output_chars"]) / CHARS_PER_TOKEN))
                pairs.append((n_in, min(n_out, 4096 - n_in)))
    return pairs


def pubmed_like() -> list[tuple[int, int]]:
    path = DATA / "perf" / "vidur" / "processed_traces" / "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"
    with path.open() as fh:
        return [(int(r["num_prefill_tokens"]), max(1, int(r["num_decode_tokens"]))) for r in csv.DictReader(fh)]


def poisson(pairs: list[tuple[int, int]], rate_rps: float, count: int, seed: int, prefix: str) -> list[TraceRequest]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for k in range(count):
        t += rng.expovariate(rate_rps)
        n_in, n_out = pairs[rng.randrange(len(pairs))]
        out.append(TraceRequest(f"{prefix}{k}", t, n_in, n_out))
    return out


def workloads(count: int) -> dict[str, list[TraceRequest]]:
    """Each at 1 req/s (plan_and_verify compresses to the planned rate)."""
    arena, pubmed = arena_like(), pubmed_like()
    mixed_a = poisson(arena, 0.8, int(count * 0.8), 3, "a")
    mixed_p = poisson(pubmed, 0.2, int(count * 0.2), 4, "p")
    return {"arena-like": poisson(arena, 1.0, count, 1, "a"), "pubmed-like": poisson(pubmed, 1.0, count, 2, "p"),
            "mixed": sorted([*mixed_a, *mixed_p], key=lambda r: r.arrival_s)}


def run(rates: list[float], tpots_ms: list[float], ttft_ms: float, count: int, cache_dir: str,
        edges: tuple[tuple[int, ...], tuple[int, ...]], names: list[str],
        rank_tau: float | None = None, factors_file: str | None = None, l40s: bool = True) -> list[dict[str, Any]]:
    """`rank_tau`: the mixes route on predicted output lengths of that quality (Kendall tau;
    1 = exact; sim.rank_noise's model), the single types as before (one type: nothing to route).
    `factors_file`: engine-model factors (`tokenyard plan --factors`) instead of the packaged fit.
    `l40s`: also plan the mix with our catalog's L40S and the L40S-only fleet (not in the paper)."""
    from scheduler.catalog import default_catalog
    from scheduler.types import SloClass
    from sim.capacity import CapacityCache
    from sim.plan_run import plan_and_verify
    from sim.plan_workload import PlanInputs, Workload
    from sim.rank_noise import noise_sd_for_tau

    factors = None
    if factors_file is not None:
        from scheduler.engine_model import load_factors_file

        factors = load_factors_file(factors_file)
    catalog = default_catalog()
    cache = CapacityCache(cache_dir)
    model = catalog.model("llama-2-7b")
    melange = tuple(catalog.gpu(g) for g in MELANGE_GPUS)
    with_l40s = (*melange, catalog.gpu("L40S"))
    points = []
    loads = workloads(count)
    for name in names:
        requests = loads[name]
        workload = Workload.from_requests(requests, *edges)
        noise_sd = None
        if rank_tau is not None:
            noise_sd = 0.0 if rank_tau >= 1 else noise_sd_for_tau([r.output_tokens for r in requests], rank_tau)
        for tpot in tpots_ms:
            slos = {"default": SloClass("default", ttft_ms, tpot)}
            base = PlanInputs(catalog, model, melange, (1,), slos, 0.95, factors=factors)
            for rate in rates:
                row: dict[str, Any] = {"workload": name, "tpot_ms": tpot, "ttft_ms": ttft_ms, "rate_rps": rate}
                fleets: list[tuple[str, tuple[Any, ...]]] = (
                    [("mix", melange), ("mix+L40S", with_l40s), *[(g.name, (g,)) for g in with_l40s]] if l40s
                    else [("mix", melange), *[(g.name, (g,)) for g in melange]])
                for fleet, gpus in fleets:
                    started = time.perf_counter()
                    fleet_inputs = dataclasses.replace(base, gpus=gpus,
                                                       rank_noise_sd=noise_sd if len(gpus) > 1 else None)
                    try:
                        verified = plan_and_verify(workload, requests, rate, fleet_inputs, cache)
                    except PlanError as exc:
                        row[fleet] = {"error": str(exc)[:120]}
                        continue
                    if fleet == "mix":
                        row["same_table"] = same_table(verified.problem)
                    row[fleet] = {"usd_per_hour": round(verified.plan.usd_per_hour, 3),
                                  "accepted": verified.accepted, "plans": verified.tries,
                                  "attainment": round(min(verified.attainment.values()), 4),
                                  "instances": verified.plan.instances(),
                                  "wall_s": round(time.perf_counter() - started, 1)}
                singles = {g: row[g]["usd_per_hour"] for g in MELANGE_GPUS if row[g].get("accepted")}
                if singles and row["mix"].get("accepted"):
                    best = min(singles, key=lambda g: singles[g])
                    row["best_single"] = best
                    row["saving_vs_best_single"] = round(1 - row["mix"]["usd_per_hour"] / singles[best], 4)
                all_singles = {g.name: row[g.name]["usd_per_hour"] for g in with_l40s
                               if g.name in row and row[g.name].get("accepted")}
                if l40s and all_singles and row["mix+L40S"].get("accepted"):
                    best = min(all_singles, key=lambda g: all_singles[g])
                    row["best_single_with_l40s"] = best
                    row["saving_with_l40s"] = round(1 - row["mix+L40S"]["usd_per_hour"] / all_singles[best], 4)
                print(json.dumps(row), flush=True)
                points.append(row)
    return points


def same_table(problem: Any, slice_factors: tuple[int, ...] = (4, 8)) -> dict[str, Any]:
    """Solve-only costs ($/h) on the first plan's own problem (its capacity table, burst-sized
    rate and 10% headroom; verification's extra headroom removed): Tokenyard's solve routed
    by input (what is verified), by (input, output) cell, Mélange's own slice ILP on the same
    table (capacities x (1 - headroom), as `scheduler.planner.melange.melange_baseline`
    solves it; Mélange's README recommends slice factor 4), the fluid bound (every bucket on
    its cheapest type in any fraction, no integrality: no planner beats it on this table),
    and the cheapest single type. Whatever the formulation leaves on the table shows here."""
    from scheduler.planner.melange import MelangeConfig, melange_baseline
    from scheduler.planner.solver import single_type_plans, solve

    first = dataclasses.replace(problem, headroom_by_pool={})
    out: dict[str, Any] = {"route_by_input": round(solve(first).usd_per_hour, 3),
                           "route_by_cell": round(solve(dataclasses.replace(first, route_by_input=False)).usd_per_hour, 3)}
    rows = 1 + max(b.row for b in first.buckets)
    cols = 1 + max(b.col for b in first.buckets)
    total = sum(b.rate_rps for b in first.buckets)
    grid = [[0.0] * cols for _ in range(rows)]
    for b in first.buckets:
        grid[b.row][b.col] += b.rate_rps / total
    usable = 1.0 - first.headroom_fraction
    tputs = []
    for option in first.options:
        table = [[0.0] * cols for _ in range(rows)]
        for k, b in enumerate(first.buckets):
            table[b.row][b.col] = option.capacity_rps[k] * usable
        tputs.append(tuple(tuple(r) for r in table))
    for factor in slice_factors:
        config = MelangeConfig(tuple(o.gpu for o in first.options), tuple(o.usd_per_hour for o in first.options),
                               tuple(tputs), tuple(tuple(r) for r in grid), total, factor)
        out[f"melange_ilp_slice{factor}"] = round(melange_baseline(config).usd_per_hour, 3)
    fluid = fluid_bound(first)
    out["fluid_usd_per_hour"] = round(fluid["mix_usd_h_per_rps"] * total / usable, 3)
    # the same bound against the best single type also in any fraction (no integer rounding)
    out["fluid_saving_vs_fluid_single"] = fluid["saving"]
    out["fluid_best_single"] = fluid["best_single"]
    singles = {g: p.usd_per_hour for g, p in single_type_plans(first).items() if not isinstance(p, PlanError)}
    out["best_single_usd_per_hour"] = round(min(singles.values()), 3) if singles else None
    return out


def plot(points: list[dict[str, Any]], path: Path) -> None:
    """Cost vs rate per fleet, one panel per workload x TPOT SLO (verified plans only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({p["workload"] for p in points})
    tpots = sorted({p["tpot_ms"] for p in points}, reverse=True)
    fig, axes = plt.subplots(len(tpots), len(names), figsize=(4.2 * len(names), 3.2 * len(tpots) + 0.6),
                             squeeze=False)
    fleets = ["mix", "mix+L40S", *MELANGE_GPUS, "L40S"]
    colors = {fleet: plt.get_cmap("tab10")(k) for k, fleet in enumerate(fleets)}
    for n, (workload, tpot) in enumerate((w, t) for t in tpots for w in names):
        ax = axes[n // len(names)][n % len(names)]
        rows = sorted((p for p in points if (p["workload"], p["tpot_ms"]) == (workload, tpot)),
                      key=lambda p: p["rate_rps"])
        for fleet in fleets:
            xs = [p["rate_rps"] for p in rows if p.get(fleet, {}).get("accepted")]
            ys = [p[fleet]["usd_per_hour"] for p in rows if p.get(fleet, {}).get("accepted")]
            if xs:
                label = {"mix": "Tokenyard mix (Mélange's 4 types)", "mix+L40S": "Tokenyard mix + L40S"}.get(
                    fleet, f"{fleet} only")
                ax.plot(xs, ys, marker="o", lw=3 if fleet.startswith("mix") else 1, color=colors[fleet], label=label,
                        ls="--" if fleet == "mix+L40S" else "-")
        ax.set_title(f"{workload}, TPOT {tpot:g} ms (llama-2-7b)", fontsize=9)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("$/h (verified plans)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.6 / (3.2 * len(tpots) + 0.6), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def fluid_bound(problem: Any) -> dict[str, Any]:
    """$/h per req/s: best type per bucket in any fraction vs each single type."""
    total = sum(b.rate_rps for b in problem.buckets)
    per_type: dict[str, float] = {}
    mix = 0.0
    for k, bucket in enumerate(problem.buckets):
        costs = {o.gpu: o.usd_per_hour / o.capacity_rps[k] for o in problem.options if o.capacity_rps[k] > 0}
        if not costs:
            continue
        mix += bucket.rate_rps / total * min(costs.values())
        for option in problem.options:
            per_type[option.gpu] = per_type.get(option.gpu, 0.0) + bucket.rate_rps / total * costs.get(
                option.gpu, float("inf"))
    finite = {g: v for g, v in per_type.items() if v != float("inf")}
    best = min(finite, key=lambda g: finite[g])
    return {"mix_usd_h_per_rps": round(mix, 4), "best_single": best,
            "best_single_usd_h_per_rps": round(finite[best], 4), "saving": round(1 - mix / finite[best], 4),
            "saving_vs_worst": round(1 - mix / max(finite.values()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="4,16")
    parser.add_argument("--tpot-ms", default="120,40")
    parser.add_argument("--ttft-ms", type=float, default=5000.0)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--workloads", default="arena-like,pubmed-like,mixed")
    parser.add_argument("--edges", choices=["fine", "default"], default="fine",
                        help="fine: this file's edges; default: the planner's (bucket granularity)")
    parser.add_argument("--rank-tau", type=float, default=None,
                        help="mixes route on predicted output lengths of this Kendall tau (1: exact); "
                             "default: by input length only")
    parser.add_argument("--factors", default=None, help="engine-model factors file (default: the packaged fit)")
    parser.add_argument("--no-l40s", action="store_true",
                        help="only Mélange's four types (skip the mix with L40S and the L40S-only fleet)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "tokenyard" / "capacity"))
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "planner_melange.json"))
    parser.add_argument("--plot-from", nargs="+", metavar="JSON", help="only draw the plot from results files")
    args = parser.parse_args()
    if args.plot_from:
        merged = [p for f in args.plot_from for p in json.loads(Path(f).read_text())["points"]]
        plot(merged, REPO_ROOT / "docs" / "img" / "planner_melange_cost_vs_rate.png")
        return
    from sim.plan_workload import DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES

    edges = (INPUT_EDGES, OUTPUT_EDGES) if args.edges == "fine" else (DEFAULT_INPUT_EDGES, DEFAULT_OUTPUT_EDGES)
    started = time.perf_counter()
    points = run([float(r) for r in args.rates.split(",")], [float(t) for t in args.tpot_ms.split(",")],
                 args.ttft_ms, args.requests, args.cache_dir, edges, args.workloads.split(","), args.rank_tau,
                 args.factors, l40s=not args.no_l40s)
    doc = {"factors": args.factors, "edges": {"input": list(edges[0]), "output": list(edges[1])}, "rank_tau": args.rank_tau, "points": points,
           "wall_s": round(time.perf_counter() - started, 1)}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
