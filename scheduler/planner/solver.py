"""The allocation integer program: fewest dollars per hour that carry the workload.

Variables: n[p], the integer number of instances of pool option p, and x[g, p] in [0, 1],
the share of routing group g's traffic sent to p (a group is one bucket, one input row
with `route_by_input`, or one routing key: an input row and a predicted output column,
holding given fractions of the true buckets the predictor sends there). Minimise sum_p cost_p n[p] subject to

    sum_p x[g, p] = 1                                   every group with traffic
    sum_g x[g, p] sum_{k in g} f_gk rate_k / cap[p, k] <= (1 - headroom) n[p]   every pool
    sum_{p of type t} tp_p n[p] <= available GPUs of type t       availability
    n[p] = 0 or min_replicas_p <= n[p] <= max_replicas_p         (semi-integer variables)
    n[p] >= floor_replicas_p                          pools the fleet runs anyway (plain integers)

A pool with a floor (instances the autoscaler keeps whatever the plan says) is paid for in
every plan, so the program counts its cost and may use its capacity. Many share splits then
cost the same (the floor's capacity is free up to its size), so a second, continuous solve
with the instance counts fixed picks among them the one the fleet pays least for when it is
sized to its load: minimise sum_p cost_p e[p] with e[p] >= load_p / (1 - headroom_p) -
floor_p, e[p] >= 0 (each pool's instance-equivalents beyond its floor). Without it the
floor's share is whatever vertex HiGHS returns, often none (`_fill_floors`).

Continuous shares make this a relaxation of Mélange's slice formulation (slices of 1/s of
a bucket are the shares k/s), so it is never costlier than Mélange at any slice factor
(`scheduler.planner.melange` keeps that formulation as the baseline to compare with).

Solver: scipy.optimize.milp (HiGHS), chosen by measurement (bench/planner.py, part
`solver`, in docs/benchmarks.md "Heterogeneous pool planner"): on 10 x 10 buckets x 7 GPU
types, best of 3, HiGHS took 22-32 ms, PuLP's CBC 41-69 ms (model building and a file
round-trip to the CBC binary), OR-Tools' SCIP 19-201 ms, all with the same optimum.
HiGHS is as fast as the best, comes with scipy (already installed through scikit-learn,
so no new dependency), and OR-Tools pins a protobuf major version older than the one the
project's gRPC stubs need.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from scheduler.planner.problem import (
    Bucket,
    Plan,
    PlanError,
    PlanProblem,
    PoolOption,
    PoolPlan,
    bucket_of,
)

_SHARE_EPS = 1e-9  # shares below this are solver noise, not routing


@dataclass(slots=True)
class _Layout:
    """Column indices of the variables: n[p] first, then x[g, p] for allowed pairs."""

    n_options: int
    groups: list[list[tuple[int, float]]]  # group -> (bucket index, fraction of its rate)
    pairs: list[tuple[int, int]]  # column n_options + k -> (group, option)

    @property
    def size(self) -> int:
        return self.n_options + len(self.pairs)


def _groups(problem: PlanProblem) -> list[list[tuple[int, float]]]:
    if problem.routing_keys is not None:
        keys = [[(k, f) for k, f in key.members if problem.buckets[k].rate_rps > 0] for key in problem.routing_keys]
        return [members for members in keys if members]
    if not problem.route_by_input:
        return [[(k, 1.0)] for k, b in enumerate(problem.buckets) if b.rate_rps > 0]
    rows: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for k, bucket in enumerate(problem.buckets):
        if bucket.rate_rps > 0:
            rows.setdefault((bucket.slo_class, bucket.row), []).append((k, 1.0))
    return list(rows.values())


def _can_serve(option: PoolOption, members: Sequence[tuple[int, float]]) -> bool:
    return all(option.capacity_rps[k] > 0 for k, _ in members)


def _unservable_error(problem: PlanProblem, members: Sequence[tuple[int, float]]) -> PlanError:
    bucket = problem.buckets[members[0][0]]
    if problem.routing_keys is not None:
        label = f"the requests predicted into {bucket.label} and its neighbours"
    else:
        label = bucket.label if len(members) == 1 else f"input row [{bucket.input_lo},{bucket.input_hi})"
    rate = sum(problem.buckets[k].rate_rps * f for k, f in members)
    return PlanError(
        f"SLO: no GPU type meets the SLO for {label} ({rate:.3g} "
        f"req/s); relax the TTFT/TPOT SLO, allow a larger GPU or higher tp, or drop those requests"
    )


def _layout(problem: PlanProblem) -> _Layout:
    groups = _groups(problem)
    pairs: list[tuple[int, int]] = []
    for g, members in enumerate(groups):
        allowed = [p for p, option in enumerate(problem.options) if _can_serve(option, members)]
        if not allowed:
            raise _unservable_error(problem, members)
        pairs.extend((g, p) for p in allowed)
    return _Layout(len(problem.options), groups, pairs)


def _load_per_share(problem: PlanProblem, members: Sequence[tuple[int, float]], option: PoolOption) -> float:
    """Instance-equivalents of load the whole group puts on one instance of `option`."""
    return sum(problem.buckets[k].rate_rps * f / option.capacity_rps[k] for k, f in members)


def _replica_bounds(problem: PlanProblem, layout: _Layout) -> list[tuple[int, int]]:
    total = [0.0] * layout.n_options
    for g, p in layout.pairs:
        total[p] += _load_per_share(problem, layout.groups[g], problem.options[p])
    bounds = []
    for p, option in enumerate(problem.options):
        usable = 1.0 - problem.headroom_for(option.name)
        upper = math.ceil(total[p] / usable + 1e-9) if total[p] > 0 else 0
        upper = max(upper, option.min_replicas) if upper > 0 else 0
        if option.max_replicas is not None:
            upper = min(upper, option.max_replicas)
        limit = problem.availability_gpus.get(option.gpu)
        if option.floor_replicas > 0:  # runs whatever the plan routes to it
            lower = max(option.floor_replicas, option.min_replicas)
            upper = max(upper, lower)
            if option.max_replicas is not None:
                upper = min(upper, option.max_replicas)
            if limit is not None and lower * option.tp > limit:
                raise PlanError(f"availability: pool {option.name}'s floor of {lower} instance(s) needs "
                                f"{lower * option.tp} {option.gpu} GPUs, the limit is {limit}; lower its minimum "
                                f"or raise the limit to {lower * option.tp}")
            if limit is not None:
                upper = min(upper, limit // option.tp)
            if upper < lower:
                raise PlanError(f"pool {option.name}: its floor of {lower} instance(s) is above its max_replicas "
                                f"{option.max_replicas}; lower the minimum or raise the maximum")
            bounds.append((lower, upper))
            continue
        if limit is not None:
            upper = min(upper, limit // option.tp)
        lower = max(1, option.min_replicas)
        bounds.append((lower, upper) if upper >= lower else (0, 0))
    return bounds


_Rows = tuple[list[int], list[int], list[float], list[float], list[float]]  # row, col, value, lower, upper


def _constraints(problem: PlanProblem, layout: _Layout, availability_slack: bool) -> list[LinearConstraint]:
    rows, cols, vals, lower, upper = _constraint_rows(problem, layout, availability_slack)
    gpu_types = {o.gpu for o in problem.options if o.gpu in problem.availability_gpus}
    width = layout.size + (len(gpu_types) if availability_slack else 0)
    matrix = coo_array((vals, (rows, cols)), shape=(len(lower), width)).tocsr()
    return [LinearConstraint(matrix, np.array(lower), np.array(upper))]


def _constraint_rows(problem: PlanProblem, layout: _Layout, availability_slack: bool) -> _Rows:
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lower: list[float] = []
    upper: list[float] = []

    def add_row(entries: Sequence[tuple[int, float]], lo: float, hi: float) -> None:
        r = len(lower)
        for c, v in entries:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        lower.append(lo)
        upper.append(hi)

    by_group: dict[int, list[int]] = {}
    by_option: dict[int, list[int]] = {}
    for k, (g, p) in enumerate(layout.pairs):
        by_group.setdefault(g, []).append(layout.n_options + k)
        by_option.setdefault(p, []).append(k)
    # With slices a share column counts slices (0..slice_factor), else it is the fraction.
    unit = float(problem.slice_factor or 1)
    for g in range(len(layout.groups)):
        add_row([(c, 1.0) for c in by_group[g]], unit, unit)
    for p, option in enumerate(problem.options):
        usable = 1.0 - problem.headroom_for(option.name)
        entries = [(layout.n_options + k,
                    _load_per_share(problem, layout.groups[layout.pairs[k][0]], option) / unit)
                   for k in by_option.get(p, [])]
        add_row([*entries, (p, -usable)], -np.inf, 0.0)
    gpu_types = sorted({o.gpu for o in problem.options if o.gpu in problem.availability_gpus})
    for t, gpu in enumerate(gpu_types):
        entries = [(p, float(o.tp)) for p, o in enumerate(problem.options) if o.gpu == gpu]
        if availability_slack:
            entries.append((layout.size + t, -1.0))
        add_row(entries, -np.inf, float(problem.availability_gpus[gpu]))
    return rows, cols, vals, lower, upper


def _run_milp(problem: PlanProblem, layout: _Layout, bounds_n: list[tuple[int, int]],
              availability_slack: bool, time_limit_s: float) -> np.ndarray | None:
    gpu_types = sorted({o.gpu for o in problem.options if o.gpu in problem.availability_gpus})
    extra = len(gpu_types) if availability_slack else 0
    width = layout.size + extra
    cost = np.zeros(width)
    if availability_slack:
        cost[layout.size:] = 1.0  # only the GPUs missing over the limits count
    else:
        cost[: layout.n_options] = [o.usd_per_hour for o in problem.options]
    lower = np.zeros(width)
    upper = np.ones(width)
    integrality = np.zeros(width)
    for p, (lo, hi) in enumerate(bounds_n):
        lower[p], upper[p] = (lo, hi) if hi > 0 else (0, 0)
        # Semi-integer: 0, or an integer in [lo, hi]; that is how min_replicas applies
        # only to pools the plan uses, without a binary "used" variable per pool. A
        # floored pool is a plain integer in [floor, hi]: it is never 0.
        integrality[p] = 3 if hi > 0 and problem.options[p].floor_replicas <= 0 else 1
    if problem.slice_factor is not None:
        upper[layout.n_options: layout.size] = problem.slice_factor
        integrality[layout.n_options: layout.size] = 1
    if availability_slack:
        upper[layout.size:] = np.inf
    result = milp(cost, integrality=integrality, bounds=Bounds(lower, upper),
                  constraints=_constraints(problem, layout, availability_slack),
                  options={"time_limit": time_limit_s, "disp": False})
    if result.x is None or result.status not in (0, 1):  # 1: time limit with a feasible point
        return None
    return np.asarray(result.x)


def _fill_floors(problem: PlanProblem, layout: _Layout, x: np.ndarray, time_limit_s: float) -> np.ndarray:
    """The cheapest plan's instance counts with the shares that load the pools beyond their
    floors least, priced (the module docstring's second solve); `x` when that solve fails."""
    counts = np.round(x[: layout.n_options])
    n_e = layout.n_options
    width = layout.size + n_e
    rows, cols, vals, lower, upper = _constraint_rows(problem, layout, False)
    for p, option in enumerate(problem.options):  # load_p / (1 - h_p) - e_p <= floor_p
        r = len(lower)
        usable = 1.0 - problem.headroom_for(option.name)
        for k, (g, q) in enumerate(layout.pairs):
            if q == p:
                rows.append(r)
                cols.append(layout.n_options + k)
                vals.append(_load_per_share(problem, layout.groups[g], option) / usable)
        rows.append(r)
        cols.append(layout.size + p)
        vals.append(-1.0)
        lower.append(-np.inf)
        upper.append(float(option.floor_replicas))
    constraint = LinearConstraint(coo_array((vals, (rows, cols)), shape=(len(lower), width)).tocsr(),
                                  np.array(lower), np.array(upper))
    cost = np.zeros(width)
    cost[layout.size:] = [o.usd_per_hour for o in problem.options]
    lo = np.zeros(width)
    hi = np.concatenate([counts, np.ones(layout.size - layout.n_options), np.full(n_e, np.inf)])
    lo[: layout.n_options] = counts
    result = milp(cost, integrality=np.zeros(width), bounds=Bounds(lo, hi), constraints=[constraint],
                  options={"time_limit": time_limit_s, "disp": False})
    if result.x is None or result.status != 0:
        return x
    return np.asarray(result.x)[: layout.size]


def _availability_error(problem: PlanProblem, layout: _Layout, bounds_unlimited: list[tuple[int, int]],
                        time_limit_s: float) -> PlanError:
    """Solve for the fewest GPUs over the limits: the nearest feasible relaxation."""
    x = _run_milp(problem, layout, bounds_unlimited, True, time_limit_s)
    gpu_types = sorted({o.gpu for o in problem.options if o.gpu in problem.availability_gpus})
    if x is None:
        return PlanError("availability: no fleet within the GPU limits carries the workload, and none "
                         "without them either; lower min_replicas or the headroom")
    missing = [(gpu, math.ceil(x[layout.size + t] - 1e-6)) for t, gpu in enumerate(gpu_types)]
    missing = [(gpu, m) for gpu, m in missing if m > 0]
    text = ", ".join(f"{gpu}: limit {problem.availability_gpus[gpu]}, raise to "
                     f"{problem.availability_gpus[gpu] + m}" for gpu, m in missing)
    return PlanError(f"availability: the workload needs more GPUs than the limits allow; the nearest "
                     f"feasible limits: {text or 'lower min_replicas or the headroom'}")


def solve(problem: PlanProblem, time_limit_s: float = 30.0) -> Plan:
    """The cheapest plan for `problem`; PlanError names the constraint that cannot be met."""
    started = time.perf_counter()
    problem.validate()
    layout = _layout(problem)
    bounds_n = _replica_bounds(problem, layout)
    x = _run_milp(problem, layout, bounds_n, False, time_limit_s)
    if x is None:
        unlimited = dataclasses.replace(problem, availability_gpus={})
        if problem.availability_gpus:
            raise _availability_error(problem, layout, _replica_bounds(unlimited, layout), time_limit_s)
        raise PlanError("plan: the solver found no feasible allocation (check max_replicas)")
    if any(o.floor_replicas > 0 for o in problem.options) and problem.slice_factor is None:
        x = _fill_floors(problem, layout, x, time_limit_s)
    plan = _plan_from(problem, layout, x, time.perf_counter() - started)
    if problem.routing_keys is not None:
        plan = _no_worse_than_rows(problem, plan, time_limit_s, started)
    return plan


def _no_worse_than_rows(problem: PlanProblem, plan: Plan, time_limit_s: float, started: float) -> Plan:
    """The keyed plan, or the input-row plan written as one (every key of a row gets the
    row's split) when that is cheaper. It is a feasible keyed plan, so a cheaper one means
    the solver stopped short: on near-zero key fractions HiGHS returned "optimal" plans 15%
    above it (bench/planner_routing.py, pubmed-like, 40 ms, before `routing_keys` dropped
    them). Keying on predictions is then never costlier than ignoring them."""
    try:
        rows = solve(dataclasses.replace(problem, routing_keys=None, route_by_input=True), time_limit_s)
    except PlanError:  # e.g. a bucket no pool serves, present in rows but only as dropped slivers in keys
        return plan
    if rows.usd_per_hour >= plan.usd_per_hour - 1e-9:
        return plan
    by_row = {(b.slo_class, b.row): dict(share) for b, share in zip(rows.buckets, rows.shares, strict=True) if share}
    keys = problem.routing_keys or ()
    key_shares = {(k.slo_class, k.row, k.col): by_row[(k.slo_class, k.row)] for k in keys
                  if (k.slo_class, k.row) in by_row}
    return dataclasses.replace(rows, key_shares=key_shares, solve_s=time.perf_counter() - started)


def _plan_from(problem: PlanProblem, layout: _Layout, x: np.ndarray, solve_s: float) -> Plan:
    counts = [int(round(v)) for v in x[: layout.n_options]]
    shares: list[dict[str, float]] = [{} for _ in problem.buckets]
    group_shares: list[dict[str, float]] = [{} for _ in layout.groups]
    load = [0.0] * layout.n_options
    for k, (g, p) in enumerate(layout.pairs):
        share = float(x[layout.n_options + k]) / (problem.slice_factor or 1)
        if share <= _SHARE_EPS:
            continue
        option = problem.options[p]
        group_shares[g][option.name] = share
        for b, fraction in layout.groups[g]:
            shares[b][option.name] = shares[b].get(option.name, 0.0) + share * fraction
        load[p] += share * _load_per_share(problem, layout.groups[g], option)
    for bucket_shares in shares:  # renormalise away the dropped noise
        total = sum(bucket_shares.values())
        for name in bucket_shares:
            bucket_shares[name] /= total
    pools = tuple(
        PoolPlan(o.name, o.gpu, o.tp, counts[p], counts[p] * o.usd_per_hour, load[p])
        for p, o in enumerate(problem.options)
    )
    cost = sum(p.usd_per_hour for p in pools)
    key_shares = None
    if problem.routing_keys is not None:
        used = [key for key in problem.routing_keys
                if any(problem.buckets[k].rate_rps > 0 for k, _ in key.members)]
        key_shares = {(key.slo_class, key.row, key.col): group_shares[g] for g, key in enumerate(used)}
    return Plan(pools, problem.buckets, tuple(shares), cost, solve_s, key_shares=key_shares)


def single_type_plans(problem: PlanProblem, time_limit_s: float = 30.0) -> dict[str, Plan | PlanError]:
    """The cheapest plan using one GPU type only (any of its TP degrees), per GPU type."""
    out: dict[str, Plan | PlanError] = {}
    for gpu in sorted({o.gpu for o in problem.options}):
        options = tuple(o for o in problem.options if o.gpu == gpu)
        sub = dataclasses.replace(problem, options=options)
        try:
            out[gpu] = solve(sub, time_limit_s)
        except PlanError as exc:
            out[gpu] = exc
    return out


__all__ = ["Bucket", "Plan", "PlanError", "PlanProblem", "PoolOption", "bucket_of", "single_type_plans", "solve"]
