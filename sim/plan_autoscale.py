"""The autoscaler in the simulator: the same control loop (scheduler/planner/autoscale.py)
on simulated time, with instances that start after a cold-start delay.

The cluster holds every instance a pool may ever have (`max_replicas`); those not
provisioned are unhealthy, so the dispatch filters skip them, exactly as the router skips
an instance it has not discovered. The loop is the simulation's `Waker`: it runs the
control ticks (`interval_s` apart on the simulated clock) and marks cold starts done at
their exact times, and sees every arrival (the live router records a request's output
length when it finishes; here the trace knows it at arrival). It applies the decisions by
setting the instances' `healthy` and `draining` flags. A draining instance is stopped at
the first tick at which it has nothing in flight (from the finish events), so the billing
record of every instance is exact, and `check_no_aborts` verifies against the request
records that no request ran on an instance after it was stopped. Ticks after the last
arrival run to `until_s`, so an idle tail scales down too.

With `resolve_interval_s` the loop re-solves the plan from the window's rates, as the
live control plane does, switches to the new plan or stays on the current plan's pools by the same
`PoolSetSwitch.resolve` call (the loop's floors and headroom in the solve, then
`keep_or_switch`: the hysteresis on the pool set, `AutoscalerConfig.switch_margin`),
and hands the chosen plan's routing table to the dispatch policy's `length_bucket` filter
(`scheduler.policies.length_bucket.set_routing_table`), so the routing follows the fleet. With `hold_until_ready` (the default) the cluster's policy
document enables the admission queue's scale-from-zero hold
(`AdmissionSpec.hold_until_ready`): a request that finds every instance of its model
down waits, bounded by the queue depth and `hold_timeout_s`, until a cold start is done,
the router's admission queue's very decision.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler.dispatch import ClusterView, DispatchPolicy
from scheduler.planner.autoscale import (
    AutoscalerConfig,
    InstanceView,
    PlanChoice,
    PoolObservation,
    PoolSetSwitch,
    decide_targets,
    pool_loads,
    reconcile,
)
from scheduler.planner.problem import Plan, PlanError, PlanProblem, bucket_of
from scheduler.planner.routing import RoutingTable, table_from_plan
from scheduler.policies.length_bucket import set_routing_table
from scheduler.policy_document import load_policy_document
from scheduler.types import Decision, RequestInfo
from sim.cluster import ClusterSpec
from sim.plan_run import Verified
from sim.plan_workload import PlanInputs, Workload, plan_cluster
from sim.records import SimResult
from sim.simulator import Simulation
from sim.workload import TraceRequest


@dataclass(slots=True)
class _Inst:
    instance_id: str
    pool: str
    state: str = "off"
    ready_s: float = math.inf
    started_s: float = 0.0
    inflight: int = 0
    last_finish_s: float = -math.inf
    intervals: list[tuple[float, float]] = field(default_factory=list)  # billed [start, stop)


@dataclass(slots=True)
class ScaleEvent:
    t_s: float
    pool: str
    replicas: int


@dataclass(slots=True)
class PlanChange:
    t_s: float
    instances: dict[str, int]  # the re-solved plan's fleet
    usd_per_hour: float
    filters_updated: int  # length_bucket filters that took its routing table
    table: RoutingTable
    pool_swap: bool = False  # its pool set differs from the plan it replaced


class AutoscaledDispatch:
    """Wraps the cluster's dispatch policy; the control loop as the simulation's waker."""

    def __init__(self, inner: DispatchPolicy, cluster: ClusterSpec, plan: Plan, capacity_rps: Mapping[str, Sequence[float]],
                 input_edges: Sequence[int], output_edges: Sequence[int], config: AutoscalerConfig,
                 cold_start_s: float, initial: Mapping[str, int], lengths: Mapping[str, tuple[int, int]],
                 problem: PlanProblem | None = None, resolve_interval_s: float | None = None) -> None:
        config.validate()
        if resolve_interval_s is not None and (problem is None or resolve_interval_s <= 0):
            raise ValueError("autoscale: resolve_interval_s needs the plan's problem and a positive interval")
        self.inner = inner
        self.reads_progress = inner.reads_progress
        self.plan = plan
        self.capacity_rps = capacity_rps
        self.edges = (list(input_edges), list(output_edges))
        self.bucket_index = {(b.row, b.col): k for k, b in enumerate(plan.buckets)}
        self.config = config
        self.cold_start_s = cold_start_s
        self.lengths = lengths  # request id -> (input, output): the histogram the router records
        self.sim: Simulation | None = None
        self.instances: dict[str, _Inst] = {}
        for pool in cluster.pools:
            for instance_id in pool.instance_ids():
                self.instances[instance_id] = _Inst(instance_id, pool.name)
        self.pools = [p.name for p in cluster.pools]
        self.targets = {p: 0 for p in self.pools}
        self.last_change = {p: -math.inf for p in self.pools}
        self.last_request = {p: -math.inf for p in self.pools}
        self.window: deque[tuple[float, int]] = deque()  # (arrival, bucket index)
        self.events: list[ScaleEvent] = []
        self.next_tick_s: float | None = None
        self.initial = dict(initial)
        self.problem = problem
        self.resolve_interval_s = resolve_interval_s
        self.last_solve_s = -math.inf
        self.plan_changes: list[PlanChange] = []  # the plan chosen at each re-solve
        self.switch = PoolSetSwitch(config)  # every re-solve's keep_or_switch
        self.pool_sizes = {p.name: p.count for p in cluster.pools}
        self._wake_s = math.inf  # the next tick or cold-start end

    # -- the DispatchPolicy surface the simulator calls -------------------------------------
    def decide(self, view: ClusterView, request: RequestInfo) -> Decision:
        now = view.now_s
        if self.next_tick_s is None:
            self._start(view, now)
        self.advance(view, now)
        return self.inner.decide(view, request)

    # -- the Waker surface (sim.simulator.Waker) -------------------------------------------
    def next_wake_s(self) -> float:
        return self._wake_s

    def wake(self, now_s: float) -> None:
        assert self.sim is not None
        if self.next_tick_s is not None:
            self.advance(self.sim.view, now_s)

    def arrived(self, request: RequestInfo, now_s: float) -> None:
        """Every arrival, before admission: a request held while its pool scales from zero
        is demand the loop must see, or it would never start an instance for it."""
        assert self.sim is not None
        if self.next_tick_s is None:
            self._start(self.sim.view, now_s)
        self.advance(self.sim.view, now_s)
        self._observe(request, now_s)

    def on_dispatch(self, request: RequestInfo, instance_id: str) -> None:
        self.instances[instance_id].inflight += 1
        self.inner.on_dispatch(request, instance_id)

    def on_finish(self, request: RequestInfo, instance_id: str) -> None:
        inst = self.instances[instance_id]
        inst.inflight -= 1
        assert self.sim is not None
        inst.last_finish_s = self.sim.now_s
        self.inner.on_finish(request, instance_id)

    # -- the control loop ---------------------------------------------------------------
    def _start(self, view: ClusterView, now: float) -> None:
        for pool, count in self.initial.items():
            self._set_target(pool, count, now, log=True)
            for inst in self._pool(pool)[:count]:
                inst.state, inst.ready_s, inst.started_s = "ready", now, now  # warm at the start
        self.next_tick_s = now + self.config.interval_s
        self._publish(view, now)

    def _pool(self, pool: str) -> list[_Inst]:
        return [i for i in self.instances.values() if i.pool == pool]

    def _observe(self, request: RequestInfo, now: float) -> None:
        n_in, n_out = self.lengths.get(request.request_id, (request.input_tokens, 1))
        key = (bucket_of(self.edges[0], n_in), bucket_of(self.edges[1], n_out))
        k = self.bucket_index.get(key)
        if k is None:
            return
        self.window.append((now, k))
        for pool in self.plan.shares[k]:
            self.last_request[pool] = now

    def advance(self, view: ClusterView, now: float) -> None:
        """Run every tick due at or before `now`, then mark cold starts that are done."""
        assert self.next_tick_s is not None
        while self.next_tick_s <= now:
            self._tick(self.next_tick_s)
            self.next_tick_s += self.config.interval_s
        self._publish(view, now)
        starting = [i.ready_s for i in self.instances.values() if i.state == "starting"]
        self._wake_s = min(self.next_tick_s, *starting) if starting else self.next_tick_s

    @property
    def plan_choices(self) -> list[tuple[float, PlanChoice]]:
        """The re-solves' keep/switch choices (`PoolSetSwitch.choices`)."""
        return self.switch.choices

    def _resolve(self, t: float, rates: Mapping[int, float]) -> None:
        """Re-solve the plan from the window's rates (the live control plane's `_resolve`),
        switch to it or stay on the current pools (`keep_or_switch`, the hysteresis on the
        pool set) and give the dispatch policy the chosen plan's routing table; a failed
        solve keeps the plan."""
        assert self.problem is not None
        self.last_solve_s = t
        if not rates:
            return  # nothing to plan from: the previous shares stand
        buckets = tuple(dataclasses.replace(b, rate_rps=rates.get(k, 0.0)) for k, b in enumerate(self.plan.buckets))
        options = tuple(dataclasses.replace(o, max_replicas=self.pool_sizes[o.name])
                        for o in self.problem.options if o.name in self.pool_sizes)
        problem = dataclasses.replace(self.problem, buckets=buckets, options=options)
        try:  # the loop's floors (min_replicas) are applied there, as in the live loop
            choice = self.switch.resolve(self.plan, problem, t)
        except PlanError:
            return
        if choice.plan is self.plan:
            return  # held: the plan and its routing table stand (the live loop publishes nothing either)
        self.plan = choice.plan
        table = table_from_plan(self.plan, self.edges[0], self.edges[1], buckets[0].slo_class)
        updated = set_routing_table(self.inner, table)
        self.plan_changes.append(PlanChange(t, self.plan.instances(), self.plan.usd_per_hour, updated, table,
                                            choice.pool_swap))

    def _tick(self, t: float) -> None:
        while self.window and self.window[0][0] < t - self.config.window_s:
            self.window.popleft()
        # Over the span the window holds, not the whole window: after an idle stretch the
        # first ticks would otherwise see a burst diluted over time with no traffic.
        arrivals = [(a, k) for a, k in self.window if a <= t]
        span_s = min(self.config.window_s, max(self.config.interval_s, t - arrivals[0][0])) if arrivals else 1.0
        rates: dict[int, float] = {}
        for _, k in arrivals:
            rates[k] = rates.get(k, 0.0) + 1.0 / span_s
        if self.resolve_interval_s is not None:
            uncovered = any(not self.plan.shares[k] for k in rates)
            if uncovered or t - self.last_solve_s >= self.resolve_interval_s:
                self._resolve(t, rates)
        loads = pool_loads(rates, self.plan.shares, self.capacity_rps)
        observations = [PoolObservation(p, loads.get(p, 0.0), self.targets[p], self.last_change[p],
                                        self.last_request[p]) for p in self.pools]
        for pool, target in decide_targets(self.config, observations, t).items():
            self._set_target(pool, target, t)
            self._reconcile(pool, target, t)

    def _set_target(self, pool: str, target: int, t: float, log: bool = False) -> None:
        if target != self.targets[pool] or log:
            self.targets[pool] = target
            self.last_change[pool] = t
            self.events.append(ScaleEvent(t, pool, target))

    def _reconcile(self, pool: str, target: int, t: float) -> None:
        members = self._pool(pool)
        for inst in members:  # a cold start done by `t` counts as ready
            if inst.state == "starting" and inst.ready_s <= t:
                inst.state = "ready"
        # A draining instance is empty at `t` if nothing is in flight now and its last
        # request finished by `t` (no request was sent to it since it began draining).
        views = [InstanceView(i.instance_id, i.state,
                              0 if (i.inflight == 0 and i.last_finish_s <= t) else max(1, i.inflight))
                 for i in members]
        actions = reconcile(views, target)
        by_id = {i.instance_id: i for i in members}
        for instance_id in actions.start:
            inst = by_id[instance_id]
            inst.state, inst.started_s, inst.ready_s = "starting", t, t + self.cold_start_s
        for instance_id in actions.undrain:
            by_id[instance_id].state = "ready" if by_id[instance_id].ready_s <= t else "starting"
        for instance_id in actions.drain:
            by_id[instance_id].state = "draining"
        for instance_id in actions.remove:
            inst = by_id[instance_id]
            inst.state = "off"
            inst.intervals.append((inst.started_s, t))
            inst.ready_s = math.inf

    def _publish(self, view: ClusterView, now: float) -> None:
        changed = False
        by_id = {s.instance_id: s for s in view.instances}
        for inst in self.instances.values():
            if inst.state == "starting" and inst.ready_s <= now:
                inst.state = "ready"
            state = by_id[inst.instance_id]
            healthy = inst.state in ("ready", "draining")
            draining = inst.state == "draining"
            if state.healthy != healthy or state.draining != draining:
                state.healthy, state.draining = healthy, draining
                changed = True
        if changed:  # the static-filter cache must see the new flags
            for seen in {id(v): v for v in (view, self.sim.view if self.sim is not None else view)}.values():
                if seen.membership_version is not None:
                    seen.membership_version += 1

    def finish(self, until_s: float) -> None:
        """Ticks after the last arrival up to `until_s`; close the billing of running instances."""
        assert self.next_tick_s is not None
        while self.next_tick_s <= until_s:
            self._tick(self.next_tick_s)
            self.next_tick_s += self.config.interval_s
        for inst in self.instances.values():
            if inst.state != "off":
                inst.intervals.append((inst.started_s, until_s))
                inst.state = "off"


@dataclass(slots=True)
class AutoscaleRun:
    result: SimResult
    events: list[ScaleEvent]
    instance_intervals: dict[str, list[tuple[float, float]]]
    usd: float  # billed instance-hours x price
    horizon_s: tuple[float, float]
    aborted: int  # requests that ran on an instance after it was stopped (must be 0)
    plan_changes: list[PlanChange] = field(default_factory=list)  # the plan chosen at each re-solve (resolve_interval_s)
    plan_choices: list[tuple[float, PlanChoice]] = field(default_factory=list)  # every re-solve's keep/switch

    @property
    def pool_swaps(self) -> int:
        """Adopted re-solves that changed the fleet's pool set (a swap, an added or a dropped pool)."""
        return sum(change.pool_swap for change in self.plan_changes)

    def reversals(self, within_s: float) -> int:
        """Scale-direction reversals of a pool within `within_s` of its previous change: flapping."""
        count = 0
        by_pool: dict[str, list[ScaleEvent]] = {}
        for event in self.events:
            by_pool.setdefault(event.pool, []).append(event)
        for events in by_pool.values():
            for a, b, c in zip(events, events[1:], events[2:], strict=False):
                if (b.replicas - a.replicas) * (c.replicas - b.replicas) < 0 and c.t_s - b.t_s < within_s:
                    count += 1
        return count

    def as_dict(self) -> dict[str, Any]:
        return {"usd": round(self.usd, 4), "aborted": self.aborted, "scale_events": len(self.events),
                "horizon_s": list(self.horizon_s)}


def check_no_aborts(result: SimResult, intervals: Mapping[str, list[tuple[float, float]]]) -> int:
    """Requests dispatched to an instance outside its billed intervals, or still running
    after the interval that held their dispatch ended."""
    bad = 0
    for record in result.records:
        if record.rejected:
            continue
        spans = intervals.get(record.instance_id, [])
        end = record.finish_s if record.finish_s is not None else math.inf
        if not any(start <= record.dispatch_s and end <= stop for start, stop in spans):
            bad += 1
    return bad


def with_scale_from_zero_hold(cluster: ClusterSpec, hold_timeout_s: float, max_queue_depth: int = 1024) -> ClusterSpec:
    """The cluster with the admission queue holding requests while every instance of their
    model is down (`hold_until_ready`), and no other saturation criterion: only a pool
    scaled to zero makes a request wait, at most `hold_timeout_s`."""
    raw = cluster.document().to_dict()
    raw["admission"] = {"enabled": True, "hold_until_ready": True, "max_queue_depth": max_queue_depth,
                        "default_queue_timeout_ms": hold_timeout_s * 1000.0,
                        "saturation": {"max_queued_per_instance": None}}
    return dataclasses.replace(cluster, policy=load_policy_document(raw, where="autoscale policy"))


def simulate_autoscaled(cluster: ClusterSpec, requests: Sequence[TraceRequest], plan: Plan,
                        capacity_rps: Mapping[str, Sequence[float]], input_edges: Sequence[int],
                        output_edges: Sequence[int], config: AutoscalerConfig, cold_start_s: float,
                        initial: Mapping[str, int], until_s: float | None = None, *,
                        problem: PlanProblem | None = None, resolve_interval_s: float | None = None,
                        hold_until_ready: bool = True, hold_timeout_s: float | None = None,
                        ranker: Callable[[TraceRequest], float | None] | None = None) -> AutoscaleRun:
    """Replay `requests` on `cluster` (pools at their maximum size) with the autoscaler;
    `resolve_interval_s` re-solves `problem` and re-routes; `hold_until_ready` holds the
    requests that find their model scaled to zero (default timeout: 2 cold starts);
    `ranker` gives each request the `predicted_rank` a plan on predicted outputs routes on."""
    if not requests:
        raise ValueError("autoscale: no requests to simulate")
    lengths = {r.request_id: (r.input_tokens, r.output_tokens) for r in requests}
    wrapper = AutoscaledDispatch(cluster.build_dispatch(), cluster, plan, capacity_rps, input_edges, output_edges,
                                 config, cold_start_s, initial, lengths, problem, resolve_interval_s)
    if hold_until_ready:
        cluster = with_scale_from_zero_hold(cluster, hold_timeout_s if hold_timeout_s is not None
                                            else 2 * cold_start_s + config.interval_s)
    # The wrapper is a DispatchPolicy by duck typing, and the simulation's waker.
    sim = Simulation(cluster, policy=wrapper, waker=wrapper, ranker=ranker)  # type: ignore[arg-type]
    wrapper.sim = sim
    result = sim.run(requests)
    start = requests[0].arrival_s
    end = max(result.end_s, until_s if until_s is not None else result.end_s)
    wrapper.finish(end)
    price = {p.name: p.usd_per_hour for p in cluster.pools}
    intervals = {i.instance_id: i.intervals for i in wrapper.instances.values()}
    usd = sum((stop - begin) / 3600.0 * price[i.pool]
              for i in wrapper.instances.values() for begin, stop in i.intervals)
    return AutoscaleRun(result, wrapper.events, intervals, usd, (start, end), check_no_aborts(result, intervals),
                        wrapper.plan_changes, wrapper.switch.choices)


def autoscale_from_plan(verified: Verified, inputs: PlanInputs, workload: Workload, requests: Sequence[TraceRequest],
                        config: AutoscalerConfig, cold_start_s: float = 60.0, spare_per_pool: int = 2,
                        until_s: float | None = None, resolve_interval_s: float | None = None,
                        hold_until_ready: bool = True, initial: Mapping[str, int] | None = None) -> AutoscaleRun:
    """The autoscaler over `requests`, starting from a verified plan's fleet (warm; or
    `initial`), every pool option of the plan's problem able to grow to its planned size +
    `spare_per_pool` (so a re-solved plan can move traffic to a pool the first plan did not
    use), routed by the plan's table and, with `resolve_interval_s`, by each re-solved one's."""
    plan = verified.plan
    sized = dataclasses.replace(plan, pools=tuple(dataclasses.replace(p, instances=p.instances + spare_per_pool)
                                                  for p in plan.pools))
    cluster = plan_cluster(sized, inputs, workload, inputs.slo_classes or {})
    capacity = {o.name: o.capacity_rps for o in verified.problem.options}
    ranker = None
    if inputs.rank_noise_sd is not None:  # a plan on predicted outputs: the same predictions as its verification
        from sim.rank_noise import NoisyRanker

        ranker = NoisyRanker(inputs.rank_noise_sd)
    return simulate_autoscaled(cluster, requests, plan, capacity, workload.input_edges, workload.output_edges,
                               config, cold_start_s, plan.instances() if initial is None else initial,
                               until_s=until_s, problem=verified.problem, resolve_interval_s=resolve_interval_s,
                               hold_until_ready=hold_until_ready, ranker=ranker)
