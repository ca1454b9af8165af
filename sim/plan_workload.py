"""Planning from a workload: a trace or a histogram in, a `PlanProblem` (with capacities from
the simulator), a verified plan out.

`Workload` is the length histogram (per SLO class: request count and mean input/output
tokens per input x output cell) with the span of time it covers. `build_problem` turns it,
at a target rate, into the planner's problem: one pool option per (GPU type, tp) the model
fits on, capacities from `sim.capacity` at each cell's mean shape. `verify_plan` replays
the trace on the planned fleet, dispatched by the plan's routing table, and reports SLO
attainment per class.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler.catalog import Catalog, GpuSpec, ModelSpec
from scheduler.engine_model import PerfFactors, factors_from_table
from scheduler.planner.predicted import routing_keys
from scheduler.planner.problem import Bucket, Plan, PlanError, PlanProblem, PoolOption
from scheduler.planner.routing import table_from_plan
from scheduler.types import SloClass
from sim.capacity import Capacity, CapacityCache, CapacityQuery
from sim.cluster import ClusterSpec, PoolSpec
from sim.engine_core import EngineConfig
from sim.workload import TraceRequest

DEFAULT_INPUT_EDGES = (0, 256, 1024, 2048, 4096, 8192)
DEFAULT_OUTPUT_EDGES = (0, 64, 256, 1024)


def _index(edges: Sequence[int], tokens: int) -> int:
    for k in range(len(edges) - 2, -1, -1):
        if tokens >= edges[k]:
            return k
    return 0


SAMPLE_PER_CELL = 48  # (input, output) pairs kept per cell for its capacity stream


@dataclass(slots=True)
class _Cell:
    count: float = 0  # requests (a histogram's cells hold rates x 1 s)
    input_sum: float = 0
    output_sum: float = 0
    sample: list[tuple[int, int]] = field(default_factory=list)

    def add(self, input_tokens: int, output_tokens: int, rng: random.Random) -> None:
        """Count a request; keep a uniform sample of the lengths (reservoir sampling)."""
        self.count += 1
        self.input_sum += input_tokens
        self.output_sum += output_tokens
        if len(self.sample) < SAMPLE_PER_CELL:
            self.sample.append((input_tokens, output_tokens))
        else:
            k = rng.randrange(int(self.count))
            if k < SAMPLE_PER_CELL:
                self.sample[k] = (input_tokens, output_tokens)

    def shapes(self) -> tuple[tuple[int, int], ...]:
        if self.sample:
            return tuple(sorted(self.sample))
        return ((max(1, round(self.input_sum / self.count)), max(1, round(self.output_sum / self.count))),)


@dataclass(slots=True)
class Workload:
    """A length histogram per SLO class over `duration_s` seconds of arrivals. The last
    edge is open-ended: it grows to the longest request seen."""

    input_edges: list[int]
    output_edges: list[int]
    cells: dict[tuple[str, int, int], _Cell] = field(default_factory=dict)
    duration_s: float = 0.0
    requests: float = 0

    @classmethod
    def from_requests(cls, requests: Iterable[TraceRequest], input_edges: Sequence[int] = DEFAULT_INPUT_EDGES,
                      output_edges: Sequence[int] = DEFAULT_OUTPUT_EDGES) -> Workload:
        for name, edges in (("input", input_edges), ("output", output_edges)):
            if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
                raise PlanError(f"--{name}-edges: expected at least 2 increasing token counts, got {list(edges)}")
        work = cls(list(input_edges), list(output_edges))
        rng = random.Random(0)
        first = last = None
        longest_in = longest_out = 0
        for req in requests:
            first = req.arrival_s if first is None else first
            last = req.arrival_s
            key = (req.slo_class, _index(input_edges, req.input_tokens), _index(output_edges, req.output_tokens))
            work.cells.setdefault(key, _Cell()).add(req.input_tokens, req.output_tokens, rng)
            longest_in = max(longest_in, req.input_tokens)
            longest_out = max(longest_out, req.output_tokens)
            work.requests += 1
        if work.requests == 0 or first is None or last is None:
            raise PlanError("workload: empty (the trace has no requests in the window); expected at least one")
        work.input_edges[-1] = max(work.input_edges[-1], longest_in + 1)
        work.output_edges[-1] = max(work.output_edges[-1], longest_out + 1)
        # One request, or a burst at one instant: count it as one second of traffic.
        work.duration_s = max(last - first, 1.0)
        return work

    @property
    def rate_rps(self) -> float:
        return self.requests / self.duration_s

    def slo_classes(self) -> list[str]:
        return sorted({k[0] for k in self.cells})

    def buckets(self, rate_rps: float | None = None) -> tuple[list[Bucket], list[tuple[tuple[int, int], ...]]]:
        """Buckets at `rate_rps` in total (default: the observed rate), with each bucket's
        sample of (input, output) lengths."""
        scale = 1.0 if rate_rps is None else rate_rps / self.rate_rps
        buckets, shapes = [], []
        for (klass, i, j), cell in sorted(self.cells.items()):
            buckets.append(Bucket(i, j, self.input_edges[i], self.input_edges[i + 1], self.output_edges[j],
                                  self.output_edges[j + 1], cell.count / self.duration_s * scale, klass))
            shapes.append(cell.shapes())
        return buckets, shapes


@dataclass(frozen=True, slots=True)
class PlanInputs:
    catalog: Catalog
    model: ModelSpec
    gpus: tuple[GpuSpec, ...]
    tps: tuple[int, ...] = (1,)
    slo_classes: Mapping[str, SloClass] = field(default_factory=dict)
    attainment: float = 0.95
    availability_gpus: Mapping[str, int] = field(default_factory=dict)
    headroom_fraction: float = 0.1
    min_replicas: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)
    route_by_input: bool = True
    # Route on the predicted output length (the ranker's predicted_rank) with this noise:
    # predicted ln(1 + tokens) = true + rank_noise_sd x N(0, 1) (sim.rank_noise's model;
    # 0: exact). None: no output prediction (route_by_input decides).
    rank_noise_sd: float | None = None
    # GPU name (lower case) -> calibrated engine-model factors (`--factors`, read by
    # `scheduler.engine_model.load_factors_file`); None: the packaged fit.
    factors: Mapping[str, PerfFactors] | None = None

    def factors_for(self, gpu: GpuSpec) -> PerfFactors | None:
        return factors_from_table(self.factors, gpu) if self.factors is not None else None


BURST_WINDOWS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def burst_factor(arrivals_s: Sequence[float], ttft_slo_s: float) -> float:
    """How much more than the mean rate a fleet needs to absorb the trace's bursts.

    A fleet serving C req/s that receives n requests within w seconds has, at worst, a
    backlog of n - C w at the end of the window, which it clears within the TTFT SLO only
    if C >= n / (w + ttft). The factor is the largest such C over windows of every length
    in BURST_WINDOWS_S, divided by the mean rate (at least 1). On the Azure traces (first
    600 s): conv ~1.3 at a 3 s TTFT, code ~5-10 (its inter-arrival CV is 13): planned at the
    mean rate, code plans missed the SLO in verification at any headroom we tried.
    """
    times = sorted(arrivals_s)
    if len(times) < 2 or times[-1] <= times[0]:
        return 1.0
    mean_rps = len(times) / (times[-1] - times[0])
    needed = 0.0
    for window_s in BURST_WINDOWS_S:
        most, lo = 0, 0
        for hi, t in enumerate(times):  # the most arrivals in any window of this length
            while times[lo] <= t - window_s:
                lo += 1
            most = max(most, hi - lo + 1)
        needed = max(needed, most / (window_s + ttft_slo_s))
    return max(1.0, needed / mean_rps)


def pool_name(gpu: GpuSpec, tp: int) -> str:
    return f"{gpu.name.lower()}-tp{tp}"


def _slo_for(inputs: PlanInputs, klass: str) -> SloClass:
    slo = inputs.slo_classes.get(klass) or inputs.slo_classes.get("default")
    if slo is None:
        known = ", ".join(sorted(inputs.slo_classes)) or "none"
        raise PlanError(f"--slo: the workload has SLO class {klass!r} but no SLO is given for it (given: {known})")
    return slo


def _relaxation(bucket: Bucket, slo: SloClass, caps: Sequence[tuple[str, Capacity]]) -> str:
    """The nearest SLO at which some pool serves the bucket (its unloaded latency + 10%)."""
    finite = [(n, c) for n, c in caps if math.isfinite(c.unloaded_ttft_ms)]
    if not finite:
        reasons = "; ".join(sorted({c.reason for _, c in caps if c.reason}))
        return f"no GPU option can run it at all ({reasons}); allow a larger GPU or a higher tp"
    name, best = min(finite, key=lambda nc: max(nc[1].unloaded_ttft_ms / max(slo.ttft_slo_ms, 1e-9),
                                                 nc[1].unloaded_tpot_ms / max(slo.tpot_slo_ms, 1e-9)))
    ttft = max(slo.ttft_slo_ms, math.ceil(best.unloaded_ttft_ms * 1.1))
    tpot = max(slo.tpot_slo_ms, math.ceil(best.unloaded_tpot_ms * 1.1))
    return (f"nearest relaxation: TTFT >= {ttft:.0f} ms and TPOT >= {tpot:.0f} ms for class "
            f"{slo.name!r} ({name} unloaded: TTFT {best.unloaded_ttft_ms:.0f} ms, TPOT "
            f"{best.unloaded_tpot_ms:.0f} ms)")


def build_problem(workload: Workload, rate_rps: float | None, inputs: PlanInputs, cache: CapacityCache,
                  progress: Callable[[int], None] | None = None,
                  on_total: Callable[[int], None] | None = None) -> tuple[PlanProblem, list[tuple[tuple[int, int], ...]]]:
    """The planner's problem at `rate_rps` with capacities by simulation (cached)."""
    buckets, shapes = workload.buckets(rate_rps)
    slos = [_slo_for(inputs, b.slo_class) for b in buckets]
    pairs = [(gpu, tp) for gpu in inputs.gpus for tp in inputs.tps]
    if on_total is not None:
        on_total(len(pairs) * len(buckets))
    table: dict[tuple[str, int], list[Capacity]] = {}
    for gpu, tp in pairs:
        row = []
        for sample, slo in zip(shapes, slos, strict=True):
            query = CapacityQuery(gpu, inputs.model, tp, sample, slo, inputs.attainment, inputs.engine,
                                  factors=inputs.factors_for(gpu))
            row.append(cache.get(query))
            if progress is not None:
                progress(1)
        table[(gpu.name, tp)] = row
    for k, bucket in enumerate(buckets):
        if bucket.rate_rps > 0 and all(table[(g.name, tp)][k].rate_rps <= 0 for g, tp in pairs):
            caps = [(pool_name(g, tp), table[(g.name, tp)][k]) for g, tp in pairs]
            raise PlanError(f"SLO: no GPU type meets the SLO of class {slos[k].name!r} (TTFT {slos[k].ttft_slo_ms:g} "
                            f"ms, TPOT {slos[k].tpot_slo_ms:g} ms) for {bucket.label}; {_relaxation(bucket, slos[k], caps)}")
    options = tuple(
        PoolOption(pool_name(gpu, tp), gpu.name, tp, gpu.usd_per_hour * tp,
                   tuple(c.rate_rps for c in table[(gpu.name, tp)]), min_replicas=inputs.min_replicas)
        for gpu, tp in pairs if any(c.rate_rps > 0 for c in table[(gpu.name, tp)])
    )
    keys = (routing_keys(buckets, shapes, workload.output_edges, inputs.rank_noise_sd)
            if inputs.rank_noise_sd is not None else None)
    problem = PlanProblem(tuple(buckets), options, dict(inputs.availability_gpus), inputs.headroom_fraction,
                          inputs.route_by_input, routing_keys=keys)
    return problem, shapes


def plan_cluster(plan: Plan, inputs: PlanInputs, workload: Workload,
                 slo_classes: Mapping[str, SloClass]) -> ClusterSpec:
    """The planned fleet as a simulator cluster, dispatched by the plan's routing tables."""
    by_name = {pool_name(g, tp): (g, tp) for g in inputs.gpus for tp in inputs.tps}
    pools = tuple(
        PoolSpec(p.name, by_name[p.name][0], inputs.model, p.tp, p.instances, inputs.engine,
                 factors=inputs.factors_for(by_name[p.name][0]))
        for p in plan.pools if p.instances > 0
    )
    classes = workload.slo_classes()

    def dispatch_for(klass: str) -> dict[str, Any]:
        table = table_from_plan(plan, workload.input_edges, workload.output_edges, klass).as_dict()
        return {"filters": ["model", "healthy", "not_draining", "not_cordoned", {"length_bucket": {"table": table}}],
                "scorers": ["least_outstanding"], "picker": "max_score"}

    base = dispatch_for(classes[0])
    per_class = {k: dispatch_for(k) for k in classes[1:]}
    return ClusterSpec(pools=pools, dispatch=base, dispatch_per_slo_class=per_class,
                       slo_classes=dict(slo_classes), default_model=inputs.model.name, catalog=inputs.catalog,
                       label="plan")


def attainment_by_class(summary: Mapping[str, Any]) -> dict[str, float]:
    return {name: float(entry["both_attainment"] or 0.0) for name, entry in summary["slo"].items()}
