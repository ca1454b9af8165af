"""The control plane's latest plan as kept in the state store, for `tokenyard plan show`.

The leader of router/controlplane.py writes it after every round (`plan_document`, under
`PLAN_KEY` with the store's expiring-entry call, as it keeps its drains); the Admin
service's GetPlan reads it back (`plan_message`). One JSON document, so a reader never
sees half of a round: the pools (replicas now, the autoscaler's target, the solved
plan's instances, cost, load, drains), the routing table (per length bucket with traffic,
each pool's share), when it was solved and written, and by which leader, and how it
routes: `route_by` (`cell`, or `predicted` on the routers' ranker) with the prediction
noise its solve planned for (`rank_noise_sd`, derived from `rank_tau` when that is what
is configured). A document written before these were recorded reads as `route_by` ""
(unknown) rather than being refused.

A document from another format, or a damaged one, is refused by name (`PlanRecordError`)
rather than shown half-read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scheduler.planner.problem import Plan

PLAN_KEY = "controlplane:plan"
PLAN_TTL_S = 7 * 86400.0  # a plan nobody has rewritten for a week is gone, not shown as current
PLAN_FORMAT = "tokenyard-plan/1"


class PlanRecordError(ValueError):
    """The stored plan is not a document this version reads."""


def plan_document(*, plan: Plan | None, solved_s: float | None, now_s: float, leader: str,
                  pools: Mapping[str, tuple[str, int]], current: Mapping[str, int],
                  targets: Mapping[str, int], loads: Mapping[str, float],
                  draining: Mapping[str, int], route_by: str = "cell", rank_tau: float | None = None,
                  rank_noise_sd: float | None = None) -> dict[str, Any]:
    """The stored form. `pools` maps each configured pool to (gpu, tp); times are epoch seconds;
    `rank_noise_sd` is the noise the stored plan's solve used (None: no keyed solve)."""
    planned = {p.name: p for p in plan.pools} if plan is not None else {}
    rows = []
    for name in sorted(pools):
        gpu, tp = pools[name]
        solved = planned.get(name)
        rows.append({"name": name, "gpu": gpu, "tp": tp, "replicas_current": int(current.get(name, 0)),
                     "replicas_target": int(targets.get(name, 0)),
                     "planned_instances": solved.instances if solved is not None else 0,
                     "usd_per_hour": round(solved.usd_per_hour, 6) if solved is not None else 0.0,
                     "load_instances": round(float(loads.get(name, 0.0)), 4),
                     "draining": int(draining.get(name, 0))})
    return {
        "format": PLAN_FORMAT, "leader": leader, "updated_unix_ms": int(now_s * 1000),
        "solved_unix_ms": int(solved_s * 1000) if plan is not None and solved_s is not None else 0,
        "usd_per_hour": round(plan.usd_per_hour, 6) if plan is not None else 0.0,
        "solver": plan.solver if plan is not None else "", "solve_s": plan.solve_s if plan is not None else 0.0,
        "pools": rows, "routes": plan.as_dict()["buckets"] if plan is not None else [],
        "route_by": route_by, "rank_tau": rank_tau,
        "rank_noise_sd": round(rank_noise_sd, 6) if plan is not None and rank_noise_sd is not None else None,
    }


def plan_message(doc: Any) -> Any:
    """The stored document as an admin_pb2.PlanStatus; PlanRecordError when it is not one."""
    from tokenyard.v1 import admin_pb2

    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise PlanRecordError(f"the stored plan ({PLAN_KEY}) is {found!r}, expected format {PLAN_FORMAT}: "
                              "a control plane of another version wrote it")
    try:
        pools = [admin_pb2.PlanPool(
            name=str(p["name"]), gpu=str(p["gpu"]), tensor_parallel=int(p["tp"]),
            replicas_current=int(p["replicas_current"]), replicas_target=int(p["replicas_target"]),
            planned_instances=int(p["planned_instances"]), usd_per_hour=float(p["usd_per_hour"]),
            load_instances=float(p["load_instances"]), draining=int(p["draining"])) for p in doc["pools"]]
        routes = [admin_pb2.PlanRoute(
            slo_class=str(r["slo_class"]), input_lo=int(r["input"][0]), input_hi=int(r["input"][1]),
            output_lo=int(r["output"][0]), output_hi=int(r["output"][1]), rate_rps=float(r["rate_rps"]),
            pool_shares={str(k): float(v) for k, v in r["pools"].items()}) for r in doc["routes"]]
        message = admin_pb2.PlanStatus(
            pools=pools, routes=routes, usd_per_hour=float(doc["usd_per_hour"]),
            solved_unix_ms=int(doc["solved_unix_ms"]), updated_unix_ms=int(doc["updated_unix_ms"]),
            leader=str(doc["leader"]), solver=str(doc["solver"]), solve_s=float(doc["solve_s"]),
            # Absent from documents written before they were recorded: unknown, not an error.
            route_by=str(doc.get("route_by") or ""))
        tau, noise_sd = doc.get("rank_tau"), doc.get("rank_noise_sd")
        if tau is not None:
            message.rank_tau = float(tau)
        if noise_sd is not None:
            message.rank_noise_sd = float(noise_sd)
        return message
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise PlanRecordError(f"the stored plan ({PLAN_KEY}) is damaged: {type(exc).__name__}: {exc}") from None
