"""The `tokenyard plan` pipeline for traces and histograms: workload -> capacities (by
simulation, cached, with a progress bar) -> integer program -> optional verification in
the simulator (re-planned with more headroom until it passes) -> JSON / text, or a day's
schedule from a rate series. `plan_and_verify` is the reusable part (bench/planner.py)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scheduler.planner.problem import Plan, PlanError, PlanProblem
from scheduler.planner.solver import solve
from scheduler.types import SloClass
from sim.capacity import CapacityCache, default_cache_dir
from sim.plan_args import (
    EXIT_NOT_VERIFIED,
    UsageError,
    emit,
    load_doc,
    parse_numbers,
    parse_pairs,
    parse_slo_classes,
)
from sim.plan_workload import (
    DEFAULT_INPUT_EDGES,
    DEFAULT_OUTPUT_EDGES,
    PlanInputs,
    Workload,
    attainment_by_class,
    build_problem,
    burst_factor,
    plan_cluster,
)
from sim.workload import TraceRequest

HEADROOM_STEP = 0.1  # added to the headroom of each pool that missed the SLO, per re-plan
MAX_HEADROOM = 0.9


@dataclass(slots=True)
class Verified:
    plan: Plan
    problem: PlanProblem
    attainment: dict[str, float]  # class -> share meeting both SLOs (empty: not verified)
    accepted: bool
    tries: int
    summary: dict[str, Any] | None = None
    burst_factor: float = 1.0  # capacity planned per unit of mean rate (sim.plan_workload.burst_factor)


def scaled_requests(requests: Sequence[TraceRequest], workload: Workload, rate_rps: float | None) -> list[TraceRequest]:
    """The trace replayed at `rate_rps` (arrivals compressed or stretched)."""
    if rate_rps is None:
        return list(requests)
    factor = workload.rate_rps / rate_rps
    return [dataclasses.replace(r, arrival_s=r.arrival_s * factor) for r in requests]


def verify(plan: Plan, inputs: PlanInputs, workload: Workload, requests: Sequence[TraceRequest],
           slo_classes: Mapping[str, SloClass]) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """Replay on the planned fleet: attainment per SLO class, per pool, and the summary."""
    from sim.report import record_outcome, summarize
    from sim.simulator import simulate

    cluster = plan_cluster(plan, inputs, workload, slo_classes)
    ranker = None
    if inputs.rank_noise_sd is not None:  # the requests carry the predictions the plan routes on
        from sim.rank_noise import NoisyRanker

        ranker = NoisyRanker(inputs.rank_noise_sd)
    result = simulate(cluster, requests, ranker=ranker)
    summary = summarize(result, dict(slo_classes))
    met: dict[str, list[int]] = {}
    for record in result.records:
        counts = met.setdefault(record.pool or "(rejected)", [0, 0])
        counts[0] += 1
        counts[1] += all(record_outcome(record, slo_classes))
    by_pool = {pool: good / total for pool, (total, good) in met.items()}
    return attainment_by_class(summary), by_pool, summary


def _classes_for(workload: Workload, slos: Mapping[str, SloClass]) -> dict[str, SloClass]:
    out = dict(slos)
    for klass in workload.slo_classes():
        if klass not in out and "default" in slos:
            out[klass] = dataclasses.replace(slos["default"], name=klass)
    return out


def plan_and_verify(workload: Workload, requests: Sequence[TraceRequest] | None, rate_rps: float | None,
                    inputs: PlanInputs, cache: CapacityCache, tries: int = 6,
                    progress: Callable[[int], None] | None = None,
                    on_total: Callable[[int], None] | None = None, bursts: bool = True) -> Verified:
    """Solve; with `requests` and `tries` > 0, replay them and re-plan until every class
    meets `inputs.attainment` (at most `tries` plans; 0: no verification). Each re-plan raises the headroom of the
    pools whose requests missed it: a pool's capacity per bucket is measured on that bucket
    alone, and long prompts mixed with long decodes on one instance interfere (a prefill
    chunk stretches every decode step of its iteration). With `bursts` and requests, the
    plan is sized for the trace's bursts (`burst_factor` x the rate), not its mean."""
    slos = _classes_for(workload, inputs.slo_classes)
    inputs = dataclasses.replace(inputs, slo_classes=slos)
    replay = scaled_requests(requests, workload, rate_rps) if requests is not None else None
    factor = 1.0
    if replay is not None and bursts:
        ttft_s = min(s.ttft_slo_ms for s in slos.values()) / 1000.0
        factor = burst_factor([r.arrival_s for r in replay], ttft_s)
    planned_rps = (rate_rps if rate_rps is not None else workload.rate_rps) * factor
    problem, _ = build_problem(workload, planned_rps, inputs, cache, progress, on_total)
    attempt = 0
    while True:
        attempt += 1
        plan = solve(problem)
        if replay is None or tries <= 0:
            return Verified(plan, problem, {}, True, attempt, burst_factor=factor)
        attainment, by_pool, summary = verify(plan, inputs, workload, replay, slos)
        ok = all(v >= inputs.attainment for v in attainment.values())
        headroom = dict(problem.headroom_by_pool)
        for pool, got in by_pool.items():
            if got < inputs.attainment and pool in plan.instances():
                headroom[pool] = min(MAX_HEADROOM, problem.headroom_for(pool) + HEADROOM_STEP)
        if ok or attempt >= tries or headroom == dict(problem.headroom_by_pool):
            return Verified(plan, problem, attainment, ok, attempt, summary, factor)
        problem = dataclasses.replace(problem, headroom_by_pool=headroom)


# -- the command ---------------------------------------------------------------------------


def _histogram_workload(doc: Any, source: str) -> Workload:
    """{input_edges, output_edges, rates: [[req/s]]} or {..., shares: [[...]], total_rate}."""
    from sim.plan_workload import _Cell

    if not isinstance(doc, Mapping):
        raise PlanError(f"{source}: expected a mapping with input_edges, output_edges and rates")
    edges = []
    for key in ("input_edges", "output_edges"):
        values = doc.get(key)
        if (not isinstance(values, list) or len(values) < 2 or not all(isinstance(v, int) for v in values)
                or any(b <= a for a, b in zip(values, values[1:], strict=False))):
            raise PlanError(f"{source}: {key}: expected an increasing list of at least 2 token counts")
        edges.append(values)
    if "rates" in doc:
        grid, scale = doc["rates"], 1.0
    elif "shares" in doc and isinstance(doc.get("total_rate"), int | float):
        grid, scale = doc["shares"], float(doc["total_rate"])
    else:
        raise PlanError(f"{source}: expected rates: [[req/s]], or shares: [[...]] with total_rate")
    if (not isinstance(grid, list) or len(grid) != len(edges[0]) - 1
            or not all(isinstance(r, list) and len(r) == len(edges[1]) - 1 for r in grid)):
        key = "rates" if "rates" in doc else "shares"
        rows, cols = len(edges[0]) - 1, len(edges[1]) - 1
        shape = (f"{len(grid)} rows of {sorted({len(r) if isinstance(r, list) else 0 for r in grid})} values"
                 if isinstance(grid, list) else type(grid).__name__)
        raise PlanError(f"{source}: {key}: expected {rows} row(s) (one per input bucket of input_edges) of {cols} "
                        f"value(s) (one per output bucket of output_edges), got {shape}")
    work = Workload(edges[0], edges[1], duration_s=1.0)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not isinstance(value, int | float) or value < 0:
                raise PlanError(f"{source}: rates[{i}][{j}]: expected a non-negative number, got {value!r}")
            rate = float(value) * scale
            if rate > 0:
                mid_in = (edges[0][i] + edges[0][i + 1]) / 2
                mid_out = (edges[1][j] + edges[1][j + 1]) / 2
                work.cells[("default", i, j)] = _Cell(rate, mid_in * rate, mid_out * rate)
                work.requests += rate
    if work.requests <= 0:
        raise PlanError(f"{source}: workload: empty (every rate is 0); expected a positive rate somewhere")
    return work


def _inputs(args: argparse.Namespace) -> PlanInputs:
    from scheduler.catalog import (
        CatalogError,
        default_catalog,
        extend_catalog,
        tensor_parallel_problem,
    )
    from tokenyard.config import load_yaml

    catalog = default_catalog()
    if args.catalog:
        catalog = extend_catalog(catalog, load_yaml(args.catalog), args.catalog)
    model = catalog.model(args.model)
    try:
        gpus = tuple(catalog.gpu(n) for n in args.gpus.split(",") if n.strip()) if args.gpus else tuple(
            sorted(catalog.gpus.values(), key=lambda g: g.usd_per_hour))
    except CatalogError as exc:
        raise UsageError(f"--gpus: {exc}") from None
    tps = tuple(parse_numbers(args.tp, "--tp", int))
    if any(t < 1 for t in tps):
        raise UsageError(f"--tp: expected positive integers, got {args.tp}")
    for t in tps:
        tp_problem = tensor_parallel_problem(model, t)
        if tp_problem:
            raise UsageError(f"--tp: {tp_problem}")
    availability = parse_pairs(args.availability, "--availability", int)
    for name in availability:
        catalog.gpu(name)
    availability = {catalog.gpu(n).name: v for n, v in availability.items()}
    if not 0 <= args.headroom < 1:
        raise UsageError(f"--headroom: expected a fraction in [0, 1), got {args.headroom}")
    if not 0 < args.attainment <= 1:
        raise UsageError(f"--attainment: expected a fraction in (0, 1], got {args.attainment}")
    if args.min_replicas < 0:
        raise UsageError(f"--min-replicas: expected >= 0, got {args.min_replicas}")
    factors = None
    if args.factors:
        from scheduler.engine_model import load_factors_file

        try:
            factors = load_factors_file(args.factors)
        except ValueError as exc:
            raise UsageError(f"--factors: {exc}") from None
    return PlanInputs(catalog, model, gpus, tps, parse_slo_classes(args.slo), args.attainment, availability,
                      args.headroom, args.min_replicas, route_by_input=args.route_by == "input", factors=factors)


def _workload(args: argparse.Namespace) -> tuple[Workload, list[TraceRequest] | None]:
    from sim.traces import read_trace

    in_edges = tuple(parse_numbers(args.input_edges, "--input-edges", int)) if args.input_edges else DEFAULT_INPUT_EDGES
    out_edges = tuple(parse_numbers(args.output_edges, "--output-edges", int)) if args.output_edges else DEFAULT_OUTPUT_EDGES
    if args.histogram:
        return _histogram_workload(load_doc(args.histogram), args.histogram), None
    window = None
    if args.window:
        start, sep, end = args.window.partition(":")
        try:
            window = (float(start), float(end))
        except ValueError:
            raise UsageError(f"--window: expected START:END seconds, got {args.window!r}") from None
        if not sep:
            raise UsageError(f"--window: expected START:END seconds, got {args.window!r}")
    requests = read_trace(args.trace, args.format, window_s=window, limit=args.limit).requests()
    return Workload.from_requests(requests, in_edges, out_edges), requests


def _progress(args: argparse.Namespace) -> tuple[Any, Callable[[int], None], Callable[[int], None]]:
    from tqdm import tqdm

    bar = tqdm(total=0, desc="capacity (simulated)", unit="table cell", file=sys.stderr,
               disable=args.no_progress, dynamic_ncols=True)

    def on_total(n: int) -> None:
        bar.total = n
        bar.refresh()

    return bar, bar.update, on_total


def _text(plan: Plan, verified: Verified | None) -> str:
    lines = [f"plan: ${plan.usd_per_hour:.2f}/h, solved in {plan.solve_s * 1000:.0f} ms"]
    for pool in plan.pools:
        if pool.instances:
            lines.append(f"  {pool.name}: {pool.instances} instance(s), ${pool.usd_per_hour:.2f}/h, "
                         f"load {pool.utilization:.0%}")
    if verified is not None and verified.attainment:
        verdict = "accepted" if verified.accepted else "NOT accepted"
        got = ", ".join(f"{k} {v:.1%}" for k, v in sorted(verified.attainment.items()))
        lines.append(f"verified in the simulator ({verified.tries} plan(s)): {got} -> {verdict}")
    return "\n".join(lines)


def _rates_text(spec: str) -> str:
    """`R,R,...`, or `@FILE` with one rate per line (or comma-separated)."""
    if not spec.startswith("@"):
        return spec
    from pathlib import Path

    try:
        text = Path(spec[1:]).read_text()
    except OSError as exc:
        raise PlanError(f"--rates {spec}: cannot read: {exc.strerror or exc}") from None
    return ",".join(part.strip() for line in text.splitlines() for part in line.split(",")
                    if part.strip() and not part.strip().startswith("#"))


def _rank_noise_sd(args: argparse.Namespace, workload: Workload, requests: Sequence[TraceRequest] | None) -> float | None:
    """--route-by predicted: the predictor's noise (sim.rank_noise's model), from --rank-noise-sd or
    from --rank-tau on the workload's own output lengths."""
    tau, sd = getattr(args, "rank_tau", None), getattr(args, "rank_noise_sd", None)
    if args.route_by != "predicted":
        if tau is not None or sd is not None:
            raise UsageError("--rank-tau / --rank-noise-sd: only with --route-by predicted")
        return None
    if (tau is None) == (sd is None):
        raise UsageError("--route-by predicted: give exactly one of --rank-tau TAU or --rank-noise-sd SD")
    if sd is not None:
        if not (sd >= 0 and math.isfinite(sd)):
            raise UsageError(f"--rank-noise-sd: expected a finite number >= 0, got {sd}")
        return float(sd)
    assert tau is not None  # exactly one of the two is given
    if not 0 < tau <= 1:
        raise UsageError(f"--rank-tau: expected a Kendall tau in (0, 1], got {tau}")
    if tau == 1:
        return 0.0
    from sim.rank_noise import noise_sd_for_tau

    outputs = ([r.output_tokens for r in requests] if requests is not None else
               [n_out for cell in workload.cells.values() for _, n_out in cell.shapes()])
    return float(noise_sd_for_tau(outputs, tau))


def run_plan(args: argparse.Namespace) -> int:
    if args.rate is not None and not (args.rate > 0 and math.isfinite(args.rate)):
        raise UsageError(f"--rate: expected a positive number of requests per second, got {args.rate}")
    if args.verify and args.histogram:
        raise UsageError("--verify replays requests: give --trace (a histogram has none)")
    if args.rates and args.rate is not None:
        raise UsageError("--rate and --rates: give one (--rate plans for one rate, --rates for a day's series)")
    if args.rates and args.verify:
        raise UsageError("--verify: not with --rates (a day's schedule is sized, not replayed); verify one step "
                         "with --rate R --verify")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit: expected a positive number of requests, got {args.limit}")
    inputs = _inputs(args)
    workload, requests = _workload(args)
    inputs = dataclasses.replace(inputs, rank_noise_sd=_rank_noise_sd(args, workload, requests))
    cache = CapacityCache(None if args.no_cache else (args.cache_dir or default_cache_dir()))
    bar, progress, on_total = _progress(args)
    try:
        if args.rates:
            from scheduler.planner.schedule import day_schedule

            rates = parse_numbers(_rates_text(args.rates), "--rates")
            problem, _ = build_problem(workload, None, dataclasses.replace(
                inputs, slo_classes=_classes_for(workload, inputs.slo_classes)), cache, progress, on_total)
            bar.close()
            schedule = day_schedule(problem, rates, args.step_s)
            doc = schedule.as_dict()
            text = "\n".join([f"day: ${schedule.scheduled_usd:.2f} scheduled vs ${schedule.static_peak_usd:.2f} "
                              f"for a static peak fleet"] +
                             [f"  t={s.start_s:>7.0f}s {s.rate_rps:>7.2f} req/s: ${s.plan.usd_per_hour:.2f}/h "
                              f"{s.plan.instances()}" for s in schedule.steps])
            emit(args, doc, text)
            return 0
        verified = plan_and_verify(workload, requests, args.rate, inputs, cache,
                                   max(1, args.verify_tries) if args.verify else 0, progress, on_total,
                                   bursts=not args.no_bursts)
    finally:
        bar.close()
    plan = verified.plan
    doc = plan.as_dict()
    doc["cost"] = round(plan.usd_per_hour, 6)
    doc["rate_rps"] = args.rate if args.rate is not None else workload.rate_rps
    doc["burst_factor"] = round(verified.burst_factor, 4)
    doc["headroom"] = {"default": verified.problem.headroom_fraction, **verified.problem.headroom_by_pool}
    from scheduler.planner.routing import table_from_plan

    doc["routing"] = {k: table_from_plan(plan, workload.input_edges, workload.output_edges, k).as_dict()
                      for k in workload.slo_classes()}
    if args.verify:
        doc["verified"] = {"accepted": verified.accepted, "attainment": verified.attainment,
                           "target": inputs.attainment, "plans_tried": verified.tries}
    emit(args, doc, _text(plan, verified if args.verify else None))
    if args.verify and not verified.accepted:
        print(f"tokenyard plan: error: verification: SLO attainment {verified.attainment} is below the target "
              f"{inputs.attainment} after {verified.tries} plan(s); raise --headroom or --verify-tries",
              file=sys.stderr)
        return EXIT_NOT_VERIFIED
    return 0
