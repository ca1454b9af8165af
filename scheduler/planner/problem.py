"""The planner's inputs and outputs as plain values: workload buckets, pool options, plans.

A *bucket* is an (input length, output length) cell of the workload histogram with its
request rate. A *pool option* is one (GPU type, tensor-parallel degree) an instance can
be built from, with its hourly price and, per bucket, the request rate one instance
sustains within the SLO (`capacity_rps`; 0 means it cannot meet the SLO for that bucket).
A `Plan` says how many instances of each option to run, which share of each bucket goes
to which pool, and what it costs per hour.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class PlanError(ValueError):
    """Bad planner input, or a plan that cannot exist: says which constraint and the
    nearest feasible relaxation."""


@dataclass(frozen=True, slots=True)
class Bucket:
    """One histogram cell: requests with input in [input_lo, input_hi) tokens and output in
    [output_lo, output_hi), arriving at `rate_rps` in total. `row`/`col` index the grid."""

    row: int
    col: int
    input_lo: int
    input_hi: int
    output_lo: int
    output_hi: int
    rate_rps: float
    slo_class: str = "default"  # buckets of different classes have their own capacities

    @property
    def label(self) -> str:
        prefix = "" if self.slo_class == "default" else f"{self.slo_class} "
        return f"{prefix}in[{self.input_lo},{self.input_hi}) out[{self.output_lo},{self.output_hi})"


@dataclass(frozen=True, slots=True)
class RoutingKey:
    """What a dispatcher routes on when it predicts output lengths: an input row and a
    *predicted* output column of one SLO class, with the traffic that lands there as
    (bucket index, fraction of that bucket's rate) pairs. A predictor that misjudges the
    output sends part of a bucket to the neighbouring keys; the planner sizes each key's
    pools for the true buckets it holds, so misrouting is planned for, not ignored."""

    slo_class: str
    row: int
    col: int
    members: tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class PoolOption:
    """Instances of one GPU type at one TP degree. `capacity_rps[k]` is the max request rate
    of bucket k one instance sustains within the SLO (0: it cannot)."""

    name: str  # the pool name in plans and routing tables, e.g. "a10g-tp1"
    gpu: str
    tp: int
    usd_per_hour: float  # one instance: price per GPU x tp
    capacity_rps: tuple[float, ...]
    min_replicas: int = 0  # when the pool is used at all (availability); 0/1: no minimum
    max_replicas: int | None = None
    # Instances the fleet runs whatever the plan routes to them (the autoscaler's minimum,
    # `AutoscalerConfig.min_replicas`): every plan holds at least this many, paid for, and
    # the solver routes to them (scheduler.planner.solver); 0: none.
    floor_replicas: int = 0


@dataclass(frozen=True, slots=True)
class PlanProblem:
    """Everything one solve needs.

    availability_gpus: GPU type -> most GPUs of that type the fleet may hold (absent: no limit).
    headroom_fraction: capacity kept free in every pool (0.2: plan pools at 80% load).
    route_by_input: a bucket's traffic is split across pools by its input length only
        (every output column of an input row gets the same split), so a dispatcher that
        knows the prompt but not the output length can follow the plan exactly.
    slice_factor: None: shares are any fraction; k: shares are multiples of 1/k of a
        group's traffic (Mélange's slices: on Mélange inputs the two formulations then
        have the same feasible set, hence the same optimum).
    routing_keys: route by (input row, predicted output column) instead: each key's
        traffic is split across pools on its own (overrides `route_by_input`). Giving all
        keys of a row the same split is the `route_by_input` plan, so a plan with keys is
        never costlier than one by input rows; with exact predictions the keys are the
        cells (Mélange's per-bucket assignment).
    """

    buckets: tuple[Bucket, ...]
    options: tuple[PoolOption, ...]
    availability_gpus: Mapping[str, int] = field(default_factory=dict)
    headroom_fraction: float = 0.0
    route_by_input: bool = False
    slice_factor: int | None = None
    # pool name -> headroom replacing `headroom_fraction` for that pool (verification
    # raises it for pools that missed the SLO: mixing buckets on an instance interferes)
    headroom_by_pool: Mapping[str, float] = field(default_factory=dict)
    routing_keys: tuple[RoutingKey, ...] | None = None

    def headroom_for(self, pool: str) -> float:
        return self.headroom_by_pool.get(pool, self.headroom_fraction)

    def validate(self) -> None:
        if not self.buckets or sum(b.rate_rps for b in self.buckets) <= 0:
            raise PlanError("workload: empty (total request rate is 0); expected at least one bucket "
                            "with a positive rate")
        if not self.options:
            raise PlanError("gpus: no GPU types to plan with; expected at least one")
        for value in (self.headroom_fraction, *self.headroom_by_pool.values()):
            if not 0.0 <= value < 1.0:
                raise PlanError(f"headroom: expected a fraction in [0, 1), got {value}")
        for bucket in self.buckets:
            if bucket.rate_rps < 0 or not math.isfinite(bucket.rate_rps):
                raise PlanError(f"workload bucket {bucket.label}: expected a non-negative rate, got "
                                f"{bucket.rate_rps}")
        if self.slice_factor is not None and self.slice_factor < 1:
            raise PlanError(f"slice_factor: expected an integer >= 1, got {self.slice_factor}")
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise PlanError(f"gpus: duplicate pool names {sorted(names)}")
        for option in self.options:
            if len(option.capacity_rps) != len(self.buckets):
                raise PlanError(f"pool {option.name}: {len(option.capacity_rps)} capacities for "
                                f"{len(self.buckets)} buckets")
            if option.usd_per_hour < 0 or any(c < 0 for c in option.capacity_rps):
                raise PlanError(f"pool {option.name}: expected a non-negative cost and capacities")
            if option.floor_replicas < 0 or (option.max_replicas is not None
                                             and option.floor_replicas > option.max_replicas):
                raise PlanError(f"pool {option.name}: floor_replicas {option.floor_replicas}: expected 0 to "
                                f"max_replicas ({option.max_replicas}); lower the pool's minimum or raise its maximum")
        for key in self.routing_keys or ():
            for k, fraction in key.members:
                if not 0 <= k < len(self.buckets) or not 0.0 < fraction <= 1.0 + 1e-9:
                    raise PlanError(f"routing key {key.slo_class} [{key.row}][{key.col}]: member ({k}, {fraction}) "
                                    f"is not (a bucket index, a fraction in (0, 1])")
        for gpu, limit in self.availability_gpus.items():
            if limit < 0:
                raise PlanError(f"availability of {gpu}: expected >= 0 GPUs, got {limit}")


@dataclass(frozen=True, slots=True)
class PoolPlan:
    """One pool of the plan."""

    name: str
    gpu: str
    tp: int
    instances: int
    usd_per_hour: float  # the whole pool
    load_instances: float  # instance-equivalents of load the pool carries (before headroom)

    @property
    def utilization(self) -> float:
        return self.load_instances / self.instances if self.instances else 0.0


@dataclass(frozen=True, slots=True)
class Plan:
    """A solved allocation. `shares[k]` maps pool name -> fraction of bucket k's rate."""

    pools: tuple[PoolPlan, ...]
    buckets: tuple[Bucket, ...]
    shares: tuple[Mapping[str, float], ...]
    usd_per_hour: float
    solve_s: float
    solver: str = "scipy-highs"
    # With routing keys: (slo_class, input row, predicted output column) -> pool shares,
    # what the routing table holds (`shares` is then each bucket's resulting mix).
    key_shares: Mapping[tuple[str, int, int], Mapping[str, float]] | None = None

    def instances(self) -> dict[str, int]:
        return {p.name: p.instances for p in self.pools if p.instances > 0}

    def gpus_by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pool in self.pools:
            if pool.instances:
                out[pool.gpu] = out.get(pool.gpu, 0) + pool.instances * pool.tp
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "usd_per_hour": round(self.usd_per_hour, 6),
            "solver": self.solver,
            "solve_s": self.solve_s,
            "pools": [
                {"name": p.name, "gpu": p.gpu, "tp": p.tp, "instances": p.instances,
                 "usd_per_hour": round(p.usd_per_hour, 6), "utilization": round(p.utilization, 4)}
                for p in self.pools if p.instances > 0
            ],
            "buckets": [
                {"slo_class": b.slo_class, "input": [b.input_lo, b.input_hi], "output": [b.output_lo, b.output_hi],
                 "rate_rps": b.rate_rps, "pools": {k: round(v, 6) for k, v in share.items()}}
                for b, share in zip(self.buckets, self.shares, strict=True) if b.rate_rps > 0
            ],
        }


def grid_buckets(input_edges: Sequence[int], output_edges: Sequence[int],
                 rates_rps: Sequence[Sequence[float]]) -> tuple[Bucket, ...]:
    """Buckets of a rate grid: rates_rps[i][j] for input [edges[i], edges[i+1]) x output [...]."""
    if len(rates_rps) != len(input_edges) - 1:
        raise PlanError(f"workload: {len(rates_rps)} input rows for {len(input_edges) - 1} input buckets")
    out: list[Bucket] = []
    for i, row in enumerate(rates_rps):
        if len(row) != len(output_edges) - 1:
            raise PlanError(f"workload row {i}: {len(row)} columns for {len(output_edges) - 1} output buckets")
        for j, rate in enumerate(row):
            out.append(Bucket(i, j, int(input_edges[i]), int(input_edges[i + 1]),
                              int(output_edges[j]), int(output_edges[j + 1]), float(rate)))
    return tuple(out)


def bucket_of(edges: Sequence[int], tokens: int) -> int:
    """Index i with edges[i] <= tokens < edges[i+1], clamped to the first and last bucket."""
    lo, hi = 0, len(edges) - 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if edges[mid] <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo
