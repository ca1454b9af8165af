"""`tokenyard plan`: size a heterogeneous GPU fleet (Mélange-style), verify it in the
simulator, schedule a day, and `tokenyard plan apply` a plan (dry run).

    tokenyard plan --melange-config example.json --json          # Mélange's input format
    tokenyard plan --trace conv.csv --rate 20 --slo default=1000:100 --gpus A10G,L4,A100-80GB \
        --tp 1,2 --availability A100-80GB=8 --verify --out plan.json
    tokenyard plan --trace conv.csv --rates 5,5,10,20,20,10 --step-s 3600   # a day's schedule
    tokenyard plan apply --plan plan.json --current a10g-tp1=3 --dry-run

Bad input (files, flags, an empty workload, an SLO no GPU meets, limits no fleet fits)
exits with status 2 and one line saying which constraint failed and the nearest relaxation.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

from sim.plan_args import (
    EXIT_BAD_INPUT,
    NativeStdoutToStderr,
    UsageError,
    emit,
    load_doc,
    parse_pairs,
)

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan", help="size a heterogeneous GPU fleet from a workload (Mélange-style), verify it in the simulator",
        description=__doc__.split("\n\n")[0])
    parser.set_defaults(handler=_cmd_plan)
    src = parser.add_argument_group("workload (one of)")
    src.add_argument("--melange-config", metavar="FILE",
                     help="Mélange's JSON input (gpu_info, workload_distribution, total_request_rate, slice_factor)")
    src.add_argument("--trace", metavar="FILE", help="a trace file (Azure, Mooncake, plain CSV/JSONL; sim/traces.py)")
    src.add_argument("--format", default="auto", help="trace format (default: detected)")
    src.add_argument("--window", metavar="START:END", help="only trace rows in this window (seconds)")
    src.add_argument("--limit", type=int, metavar="N", help="at most N trace requests")
    src.add_argument("--histogram", metavar="FILE",
                     help="YAML/JSON {input_edges, output_edges, rates: [[req/s]]} (or shares + total_rate)")
    parser.add_argument("--rate", type=float, metavar="RPS", help="plan for this total rate (default: the trace's)")
    parser.add_argument("--rates", metavar="R,R,...", help="a day's rate series: one plan per step "
                        "(or @FILE: one rate per line)")
    parser.add_argument("--step-s", type=float, default=3600.0, help="seconds per --rates step (default 3600)")
    parser.add_argument("--slo", action="append", metavar="CLASS=TTFT_MS:TPOT_MS",
                        help="SLO per class (repeat); default: the built-in interactive/default/batch classes")
    parser.add_argument("--attainment", type=float, default=0.95,
                        help="share of requests that must meet both SLOs (default 0.95)")
    parser.add_argument("--model", default="llama-3-8b", help="catalog model (default llama-3-8b)")
    parser.add_argument("--catalog", metavar="FILE", help="catalog YAML extending the built-in (e.g. prices)")
    parser.add_argument("--factors", metavar="JSON",
                        help="engine-model factors per GPU (`tokenyard calibrate --write`): capacities and "
                             "verification use them (default: the packaged fit)")
    parser.add_argument("--gpus", metavar="A,B", help="GPU types to consider (default: the whole catalog)")
    parser.add_argument("--tp", default="1", metavar="1,2", help="tensor-parallel degrees (default 1)")
    parser.add_argument("--availability", metavar="GPU=N,...", help="most GPUs per type")
    parser.add_argument("--headroom", type=float, default=0.1, help="capacity left free per pool (default 0.1)")
    parser.add_argument("--min-replicas", type=int, default=0, help="instances per used pool, at least")
    parser.add_argument("--input-edges", metavar="0,256,...", help="input-length bucket edges (tokens)")
    parser.add_argument("--output-edges", metavar="0,64,...", help="output-length bucket edges (tokens)")
    parser.add_argument("--route-by", choices=["input", "cell", "predicted"], default="input",
                        help="split traffic by input bucket only (what a router can see; default), by cell "
                             "(the output length known in advance), or by input and *predicted* output "
                             "(the router's output-length ranker; give --rank-tau or --rank-noise-sd)")
    parser.add_argument("--rank-tau", type=float, metavar="TAU",
                        help="--route-by predicted: the ranker's Kendall tau (`tokenyard train rank` reports "
                             "its held-out tau); misrouting is planned for")
    parser.add_argument("--rank-noise-sd", type=float, metavar="SD",
                        help="--route-by predicted: the prediction's noise on ln(1 + output tokens) instead "
                             "(0: exact)")
    parser.add_argument("--continuous", action="store_true",
                        help="Mélange input: split buckets in any fraction, not in slices")
    parser.add_argument("--baseline", action="store_true", help="Mélange input: also solve Mélange's formulation")
    parser.add_argument("--verify", action="store_true",
                        help="replay the workload on the planned fleet; accept only if attainment is met")
    parser.add_argument("--verify-tries", type=int, default=6,
                        help="plans to try: each re-plan gives pools that missed the SLO 10%% more headroom "
                             "(default 6)")
    parser.add_argument("--no-bursts", action="store_true",
                        help="plan for the mean rate, not for the trace's bursts (see burst_factor)")
    parser.add_argument("--cache-dir", metavar="DIR", help="capacity cache (default ~/.cache/tokenyard/capacity)")
    parser.add_argument("--no-cache", action="store_true", help="measure capacities again, cache nothing")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--out", metavar="FILE", help="also write the plan JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub = parser.add_subparsers(dest="plan_command", metavar="SUBCOMMAND")
    apply = sub.add_parser(
        "apply", help="apply a plan's replica counts (drain before removing)",
        description="Print the steps that take the fleet from --current replicas to the plan's: scale-ups "
                    "first, then each scale-down after a drain of the instances it removes, with the kubectl "
                    "commands. Only --dry-run is available here; `tokenyard controlplane` carries a plan out "
                    "in a cluster (docs/planner.md).")
    apply.add_argument("--plan", required=True, metavar="FILE", help="a plan JSON written by --out")
    apply.add_argument("--current", metavar="POOL=N,...", help="current replicas (dry run; default: none)")
    apply.add_argument("--dry-run", action="store_true", help="print the steps and commands, change nothing")
    apply.add_argument("--namespace", default="default", help="Kubernetes namespace in the printed commands")
    apply.set_defaults(handler=_cmd_apply)


def _guarded(body: Callable[[], int], command: str) -> int:
    from scheduler.catalog import CatalogError
    from scheduler.planner.problem import PlanError
    from sim.traces import TraceError
    from tokenyard.config import ConfigError

    try:
        return body()
    except (PlanError, UsageError, ConfigError, CatalogError, TraceError, OSError, ValueError) as exc:
        log.debug("%s failed", command, exc_info=True)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"tokenyard {command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _cmd_plan(args: argparse.Namespace) -> int:
    def body() -> int:
        with NativeStdoutToStderr() as redirect:
            args.stdout_redirect = redirect
            return _plan(args)

    return _guarded(body, "plan")


def _cmd_apply(args: argparse.Namespace) -> int:
    return _guarded(lambda: _apply(args), "plan apply")


def _plan(args: argparse.Namespace) -> int:
    sources = [s for s in (args.melange_config, args.trace, args.histogram) if s]
    if len(sources) != 1:
        raise UsageError("expected exactly one of --melange-config, --trace, --histogram")
    if args.out:
        from sim.report import check_output_path

        try:
            check_output_path(args.out, "--out")  # before the solve, not after it
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.melange_config:
        return _plan_melange(args)
    from sim.plan_run import run_plan

    return run_plan(args)


def _plan_melange(args: argparse.Namespace) -> int:
    from scheduler.planner.melange import melange_baseline, melange_problem, parse_melange_config
    from scheduler.planner.solver import solve

    config = parse_melange_config(load_doc(args.melange_config), args.melange_config)
    plan = solve(melange_problem(config, continuous=args.continuous))
    doc: dict[str, Any] = {name: plan.instances().get(name, 0) for name in config.gpu_names}
    doc["cost"] = round(plan.usd_per_hour, 6)
    doc["plan"] = plan.as_dict()
    text = ", ".join(f"{n}x {name}" for name, n in plan.instances().items()) + f" at ${plan.usd_per_hour:.2f}/h"
    if args.baseline:
        base = melange_baseline(config)
        doc["melange_baseline"] = {**base.counts, "cost": round(base.usd_per_hour, 6), "solve_s": base.solve_s}
        text += f" (Mélange's formulation: ${base.usd_per_hour:.2f}/h)"
    emit(args, doc, text)
    return 0


def _apply(args: argparse.Namespace) -> int:
    from scheduler.planner.actuator import DryRunActuator, apply_plan, plan_steps

    doc = load_doc(args.plan)
    pools = doc.get("pools") if isinstance(doc, Mapping) else None
    if not isinstance(pools, list) or not all(isinstance(p, Mapping) and isinstance(p.get("name"), str)
                                              and isinstance(p.get("instances"), int) for p in pools):
        raise UsageError(f"{args.plan}: expected a plan JSON with pools: [{{name, instances}}] (tokenyard plan --out)")
    target = {p["name"]: int(p["instances"]) for p in pools}
    current = parse_pairs(args.current, "--current", int)
    negative = {name: n for name, n in current.items() if n < 0}
    if negative:
        raise UsageError(f"--current: expected replica counts >= 0, got {negative}")
    if not args.dry_run:
        raise UsageError("plan apply: only --dry-run is available here; `tokenyard controlplane` (docs/planner.md) "
                         "carries a plan out in a cluster")
    actuator = DryRunActuator(replicas=dict(current), namespace=args.namespace)
    steps = plan_steps(current, target)
    apply_plan(actuator, target)
    for step in steps:
        print(step.describe())
    for command in actuator.commands:
        print(command)
    return 0
