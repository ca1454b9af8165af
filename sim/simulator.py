"""The discrete-event simulator: replays a trace through the live scheduler classes.

One event loop on simulated time (a heap of iteration ends; arrivals are streamed from the
trace iterable, never all held in memory). Each engine instance is an `EngineCore` driven
exactly as the emulated engine drives it, with a heap event instead of a sleep. Every
arrival is placed by the same `DispatchPolicy.decide(ClusterView, RequestInfo)` the router
calls, on `InstanceState`s kept the way the router keeps them: `router_inflight` +1 on
dispatch and -1 on finish, engine load either live (`load_refresh_s: 0`) or as last
scraped every `load_refresh_s`. Queue order comes from a `scheduler.queueing` policy.

The decisions are the cluster's policy document run by `scheduler.layer.DecisionLayer`,
called as the router calls it: the profile selected per tenant and SLO class, the
candidate window over the request's model's instances, session affinity (an in-memory
table, keyed per tenant), the engine priority, and, when the document enables admission,
the same `AdmissionQueue` the router holds: a request that finds its model saturated waits
in it (its record's dispatch time is its release), and is shed or refused as the router
would answer it (a rejected record whose reason starts with `shed` or `refused`).

Speed: a stretch of identical decode steps is one event (`EngineCore.plan_decode_run`),
cut short when an arrival lands on that instance; the load other instances' dispatch
decisions see inside a stretch is computed in closed form, so fast-forward on and off
produce the same decisions and the same token times.

Events at equal times: iteration ends first, then arrivals (in trace order); timeline
samples and load scrapes at time t see the state after every event at t.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any, Protocol

from scheduler.admission import AdmissionQueue, Offer, Verdict
from scheduler.dispatch import ClusterView, DispatchPolicy
from scheduler.engine_model import FrontEndCost
from scheduler.layer import DecisionLayer, group_by_model
from scheduler.prefill_rate import note_dispatch
from scheduler.queueing import QueuedRequest
from scheduler.session_affinity import InMemoryAffinity, can_own, follow, resolve_affinity
from scheduler.tiers import TierChoice, TierRouter
from scheduler.types import Decision, NoInstanceAvailable, RequestInfo, SloClass
from sim.cluster import ClusterSpec
from sim.migration import MigrationDriver, MigrationSimConfig, migration_from_document
from sim.records import RequestRecord, SimResult, TimelineSample
from sim.sim_instance import SimInstance, SimRequest
from sim.tier_noise import TierNoise
from sim.tier_scores import TierScorer, tier_router_for, tier_scorer
from sim.workload import TraceRequest

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, int, int], None]

_PROGRESS_EVERY_EVENTS = 2048  # check the wall clock this often
_PROGRESS_MIN_WALL_S = 0.25  # and report at most this often


class Waker(Protocol):
    """A driver part that changes instances over simulated time (the autoscaler: control
    ticks, cold starts that finish): the loop runs `wake` at `next_wake_s()` while other
    events are pending, then re-offers held requests (an instance may have come up)."""

    def next_wake_s(self) -> float: ...

    def wake(self, now_s: float) -> None: ...

    def arrived(self, request: RequestInfo, now_s: float) -> None:
        """Every arrival, before admission (demand the autoscaler must see even when the
        request is held)."""


class Simulation:
    """One run of a cluster over a trace; `simulate` is the usual entry point."""

    def __init__(
        self,
        cluster: ClusterSpec,
        *,
        policy: DispatchPolicy | None = None,
        progress: ProgressFn | None = None,
        seed: int = 0,
        timeline_interval_s: float = 10.0,
        fast_forward: bool = True,
        total_requests: int = 0,
        tier_router: TierRouter | None = None,
        migration: MigrationSimConfig | None = None,
        ranker: Callable[[TraceRequest], float | None] | None = None,
        tier_noise: TierNoise | None = None,
        waker: Waker | None = None,
    ) -> None:
        if timeline_interval_s <= 0:
            raise ValueError(f"timeline_interval_s: expected a positive number, got {timeline_interval_s}")
        self.cluster = cluster
        self.layer = DecisionLayer(cluster.document(), seed=seed, override=policy)
        document = self.layer.document
        if migration is None:  # the policy document's `migration:` section (off by default)
            migration = migration_from_document(document.migration)
        self.policy = policy or self.layer.profiles[document.selection.default]
        self.affinity: InMemoryAffinity | None = InMemoryAffinity() if document.affinity.enabled else None
        self.affinity_ttl_s = document.affinity.ttl_s
        self.admission: AdmissionQueue | None = (
            self.layer.new_admission_queue() if self.layer.admission_enabled else None
        )
        self.held: dict[str, TraceRequest] = {}  # request id -> trace request, while queued
        self.queue_deadline_s = math.inf  # when the next held request times out
        self.ranker = ranker  # predicted_rank of each arrival (sim.rank_noise); None: unset
        self.waker = waker
        # Inside a decode stretch only KV use and tokens in flight change (running and
        # waiting counts change only at its ends, where the snapshot is published). They
        # (and the snapshot time) are published, and kept exact at every decision, only
        # when a policy reads them (`reads_progress`); otherwise they stay unset.
        self.publish_progress = self.layer.reads_progress or (
            self.admission is not None and document.admission.saturation.max_kv_usage is not None
        )
        self.progress = progress
        self.timeline_interval_s = timeline_interval_s
        self.fast_forward = fast_forward and migration is None  # moves change batches mid-step
        self.total_requests = total_requests
        self.live_load = cluster.load_refresh_s <= 0
        self.instances: list[SimInstance] = []
        for pool in cluster.pools:
            model = pool.engine_model()  # one per pool: its cores share the model's caches
            for instance_id in pool.instance_ids():
                self.instances.append(SimInstance(len(self.instances), instance_id, pool, model))
        self.by_id = {inst.state.instance_id: inst for inst in self.instances}
        for instance_id in cluster.cordoned:
            self.by_id[instance_id].state.cordoned = True
        # Instances change health only through a waker (the autoscaler) and their cordon
        # only through `set_cordoned`; both bump this version so the static-filter cache
        # sees the new flags.
        self.view = ClusterView([inst.state for inst in self.instances], membership_version=0)
        self.groups = group_by_model(self.view.instances)  # stable tuples: the static-filter cache holds
        self.in_runs: dict[int, SimInstance] = {}  # instances inside a fast-forward run
        self.next_run_change_s = math.inf  # earliest next_change_s over in_runs (or earlier)
        self.heap: list[tuple[float, int, SimInstance, int]] = []
        self.seq = 0
        self.now_s = 0.0
        self.records: list[RequestRecord] = []
        self.timeline: list[TimelineSample] = []
        self.events = 0
        self._last_progress_wall = 0.0
        self.finished = 0
        self.arrived = 0
        self.default_slo = cluster.slo_classes.get("default")
        # Requests naming the tier alias get their model from the tier decision, before
        # dispatch, on the same load view dispatch reads (as the router does).
        # Requests without a score get one from sim/tier_scores.py: the predictor on their
        # prompt, else the noise model (`tier_noise`; with a `tier_router` given, only when
        # `tier_noise` is).
        self.tier_scorer: TierScorer | None = None
        if tier_router is None:  # a cluster whose policy document has `tiers:` brings its own
            built = tier_router_for(cluster.policy)
            if built is not None:
                tier_router = built[0]
                self.tier_scorer = tier_scorer(built[0], built[1], tier_noise, seed)
        elif tier_noise is not None:
            self.tier_scorer = tier_scorer(tier_router, None, tier_noise, seed)
        self.tier_router = tier_router
        self.tier_rng = random.Random(seed)
        self.migration = MigrationDriver(self, migration) if migration is not None else None
        self.front_end = cluster.front_end  # client-side time outside the engine, added to records

    # ------------------------------------------------------------------ loop
    def run(self, requests: Iterable[TraceRequest]) -> SimResult:
        wall_start = time.perf_counter()
        arrivals = _through_front_end(requests, self.front_end)
        upcoming = next(arrivals, None)
        start_s = upcoming.arrival_s if upcoming is not None else 0.0
        self.now_s = start_s
        next_sample_s = start_s
        next_scrape_s = math.inf if self.live_load else start_s
        heap = self.heap
        heappop = heapq.heappop
        iteration_end = self._iteration_end
        self._last_progress_wall = wall_start
        progress_at_events = _PROGRESS_EVERY_EVENTS if self.progress is not None else math.inf
        last_arrival_s = -math.inf
        events = 0
        migration = self.migration
        waker = self.waker
        while True:
            if waker is not None and self._wake_if_due(waker, upcoming):
                continue  # the waker acted first (its time came before any other event)
            if migration is not None and migration.advance(min(
                    heap[0][0] if heap else math.inf, upcoming.arrival_s if upcoming is not None else math.inf)):
                continue  # a migration step (sim/migration.py) came first
            # The next event: an iteration end, or else the next arrival (ends first at equal times).
            if heap and (upcoming is None or heap[0][0] <= upcoming.arrival_s):
                t = heap[0][0]
                arrival = None
            elif upcoming is not None:
                t = upcoming.arrival_s
                arrival = upcoming
            elif self.held:
                self.now_s = self.queue_deadline_s
                self._expire_queue(self.now_s)  # nothing else will happen: held requests time out
                continue
            else:
                break
            while self.queue_deadline_s <= t:  # held requests time out at their deadlines
                self.now_s = self.queue_deadline_s
                self._expire_queue(self.now_s)
            if next_sample_s < t:
                next_sample_s = self._sample_until(next_sample_s, t)
            if next_scrape_s < t:
                next_scrape_s = self._scrape_until(next_scrape_s, t)
            self.now_s = t
            events += 1
            if arrival is None:
                _, _, inst, version = heappop(heap)
                if version == inst.version:
                    iteration_end(inst, t)
            else:
                if t < last_arrival_s:
                    raise ValueError(
                        f"trace is not sorted by arrival time: request {arrival.request_id!r} "
                        f"arrives at {t} s, after one at {last_arrival_s} s"
                    )
                last_arrival_s = t
                self._arrive(arrival)
                upcoming = next(arrivals, None)
            if events >= progress_at_events:
                progress_at_events = self._report_progress(events, t)
        self.events = events
        end_s = self.now_s
        self._sample_until(next_sample_s, end_s + 1e-12)
        if self.progress is not None:
            self.progress(end_s, self.finished, max(self.total_requests, self.arrived))
        for inst in self.instances:
            inst.stats.kv_usage_time_integral = inst.kv_block_s / max(1, inst.core.num_kv_blocks)
            inst.stats.preemptions = inst.core.preemptions_total
        return SimResult(
            records=self.records,
            instances=[inst.stats for inst in self.instances],
            timeline=self.timeline,
            start_s=start_s,
            end_s=end_s,
            wall_s=time.perf_counter() - wall_start,
            events=self.events,
            policy=self.cluster.label or self.cluster.describe_dispatch(),
            migrations=self.migration.stats.summary() if self.migration is not None else None,
        )

    def _wake_if_due(self, waker: Waker, upcoming: TraceRequest | None) -> bool:
        """Run the waker when it is due before the next event, while anything is pending
        (it never keeps a finished simulation alive); then release held requests."""
        heap = self.heap
        if not heap and upcoming is None and not self.held:
            return False
        wake_s = waker.next_wake_s()
        next_s = min(heap[0][0] if heap else math.inf, upcoming.arrival_s if upcoming is not None else math.inf)
        if not heap and upcoming is None:
            next_s = self.queue_deadline_s  # only held requests left: their deadlines are the events
        if wake_s > next_s or math.isinf(wake_s):
            return False
        while self.queue_deadline_s <= wake_s:
            self.now_s = max(self.now_s, self.queue_deadline_s)
            self._expire_queue(self.now_s)
        self.now_s = max(self.now_s, wake_s)
        waker.wake(self.now_s)
        if self.held:
            self._release_queue(self.now_s)
        return True

    def _report_progress(self, events: int, now_s: float) -> float:
        """Call the progress callback if enough wall time passed; the event count to check next."""
        assert self.progress is not None
        wall = time.perf_counter()
        if wall - self._last_progress_wall >= _PROGRESS_MIN_WALL_S:
            self._last_progress_wall = wall
            self.progress(now_s, self.finished, max(self.total_requests, self.arrived))
        return events + _PROGRESS_EVERY_EVENTS

    # -------------------------------------------------------------- arrivals
    def _arrive(self, trace: TraceRequest) -> None:
        now = self.now_s
        self.arrived += 1
        model = trace.model or self.cluster.default_model
        slo = self.cluster.slo_classes.get(trace.slo_class, self.default_slo)
        info = RequestInfo(
            request_id=trace.request_id,
            model=model,
            input_tokens=trace.input_tokens,
            tenant=trace.tenant,
            slo_class=trace.slo_class,
            session_id=trace.session_id,
            prefix_hashes=trace.prefix_hashes,
            p_small_ok=trace.p_small_ok,
            predicted_rank=self.ranker(trace) if self.ranker is not None else None,
            arrival_s=now,
        )
        if self.tier_router is not None and self.tier_router.handles(model):
            # The tier decides the model first, as the router resolves the alias before admission.
            info = dataclasses.replace(info, model=self.decide_tier(info, trace, slo, now).model)
        if self.waker is not None:
            self.waker.arrived(info, now)
        admission = self.admission
        if admission is not None:
            if self.held:
                self._release_queue(now)
            if self.live_load and self.in_runs and self.publish_progress:
                self._refresh_runs(now)
            offer = self.offer(info, now)
            if offer.evicted is not None:
                self._answer_held(offer.evicted, Verdict.SHED, offer.reason)
            if offer.verdict is Verdict.QUEUE:
                self.held[info.request_id] = trace
                self.queue_deadline_s = admission.next_deadline_s() or math.inf
                return
            if offer.verdict is not Verdict.ADMIT:
                self._answer(trace, info, slo, offer.verdict, offer.reason)
                return
        self._dispatch(trace, info, slo, now)

    def decide_tier(self, info: RequestInfo, trace: TraceRequest, slo: SloClass | None, now_s: float) -> TierChoice:
        """The tier of a request naming the alias: `TierRouter.decide` on the load view, as
        the router's `TierResolver.decide_info` runs it; an unscored request is scored first
        (sim/tier_scores.py: its prompt, else the noise model)."""
        assert self.tier_router is not None
        self.view.now_s = now_s
        if info.p_small_ok is None and self.tier_scorer is not None:
            info = dataclasses.replace(info, p_small_ok=self.tier_scorer(trace))
        return self.tier_router.decide(info, self.view.instances, slo, self.tier_rng)

    def offer(self, info: RequestInfo, now: float) -> Offer:
        """The admission queue's answer to an arrival (the router's `RouterAdmission.offer`)."""
        admission = self.admission
        assert admission is not None
        layer = self.layer
        return admission.offer(info, layer.slo_classes.get(info.slo_class),
                               layer.saturated(self.groups.get(info.model.lower(), ()), info), now)

    def set_cordoned(self, instance_id: str, cordoned: bool) -> None:
        """Cordon an instance (no new requests, its running ones stay), or undo it: the
        router's `instances cordon`. The static filters' cache sees the new flag."""
        state = self.by_id[instance_id].state
        if state.cordoned != cordoned:
            state.cordoned = cordoned
            assert self.view.membership_version is not None
            self.view.membership_version += 1

    def decide(self, info: RequestInfo, now: float) -> Decision:
        """The decision for one request on the current load views, as the router's
        `Dispatcher.decide` takes it: profile, window, then the session's owner first."""
        layer = self.layer
        decision = layer.decide(layer.profile(info), self.groups.get(info.model.lower(), ()), info, now,
                                fallback=self.view.instances, membership_version=self.view.membership_version)
        affinity = self.affinity
        if affinity is not None and info.session_id is not None:
            by_id = self.by_id
            model = info.model

            def usable(instance_id: str) -> bool:
                found = by_id.get(instance_id)
                return can_own(found.state if found is not None else None, model)

            decision = resolve_affinity(affinity, info, decision, self.affinity_ttl_s, now, usable)
        return decision

    def _dispatch(self, trace: TraceRequest, info: RequestInfo, slo: SloClass | None, now: float) -> None:
        layer = self.layer
        policy = layer.profile(info)
        if self.live_load and self.in_runs and self.publish_progress:
            self._refresh_runs(now)
        try:
            decision = self.decide(info, now)
        except NoInstanceAvailable as exc:
            self._reject(trace, info, slo, f"no instance available: {exc}")
            return
        affinity = self.affinity
        priority = layer.priority(info, now)
        reasons: list[str] = []
        by_id = self.by_id
        for instance_id in decision.instance_ids:
            found = by_id.get(instance_id)
            if found is None:
                raise KeyError(f"the dispatch policy chose an unknown instance {instance_id!r}")
            inst = found
            req = SimRequest(
                request_id=trace.request_id,
                prompt_tokens=trace.input_tokens,
                output_tokens=trace.output_tokens,
                arrival_s=info.arrival_s,
                priority=priority,
                prefix_hashes=trace.prefix_hashes,
                prefix_block_tokens=trace.prefix_block_tokens,
                trace=trace,
                info=info,
                slo=slo,
                policy=policy,
                instance=inst,
                dispatch_s=now,
            )
            try:
                inst.core.add_request(req)
            except ValueError as exc:
                reasons.append(f"{instance_id}: {exc}")
                continue
            state = inst.state
            note_dispatch(state, info.input_tokens, now)
            if self.live_load:
                state.waiting = inst.core.num_waiting
                state.kv_blocks_queued = inst.core.waiting_blocks
            inst.stats.requests += 1
            policy.on_dispatch(info, instance_id)
            if affinity is not None and reasons:
                follow(affinity, info, instance_id, self.affinity_ttl_s, now)
            if inst.run is not None:
                self._cut_run(inst, now)
            elif inst.batch is None:
                self._start_iteration(inst, now)
            return
        self._reject(trace, info, slo, "no instance can take it: " + "; ".join(reasons[:3]))

    # ------------------------------------------------------- admission queue
    def _release_queue(self, now: float) -> None:
        """Dispatch held requests, in queue-sort order, while their model has capacity."""
        admission = self.admission
        assert admission is not None
        if self.live_load and self.in_runs and self.publish_progress:
            self._refresh_runs(now)
        layer = self.layer
        groups = self.groups

        def can_release(item: QueuedRequest) -> bool:
            request = item.request
            return not layer.saturated(groups.get(request.model.lower(), ()), request)

        while self.held:
            item = admission.release(now, can_release)
            if item is None:
                break
            trace = self.held.pop(item.request.request_id)
            slo = self.cluster.slo_classes.get(trace.slo_class, self.default_slo)
            self._dispatch(trace, item.request, slo, now)
        self.queue_deadline_s = admission.next_deadline_s() or math.inf

    def _expire_queue(self, now: float) -> None:
        admission = self.admission
        assert admission is not None
        for item, verdict in admission.expire(now):
            self._answer_held(item, verdict, "queue timeout")
        self.queue_deadline_s = admission.next_deadline_s() or math.inf

    def _answer_held(self, item: QueuedRequest, verdict: Verdict, reason: str) -> None:
        trace = self.held.pop(item.request.request_id)
        slo = self.cluster.slo_classes.get(trace.slo_class, self.default_slo)
        self._answer(trace, item.request, slo, verdict, reason)

    def _answer(self, trace: TraceRequest, info: RequestInfo, slo: SloClass | None, verdict: Verdict,
                reason: str) -> None:
        """A request the admission queue turned away: shed (429) or refused (503)."""
        if verdict is Verdict.SHED:
            self._reject(trace, info, slo, f"shed (429): {reason}")
        else:
            self._reject(trace, info, slo, f"refused (503): {reason}")

    def _reject(self, trace: TraceRequest, info: RequestInfo, slo: SloClass | None, reason: str) -> None:
        self.finished += 1
        self.records.append(
            RequestRecord(
                request_id=trace.request_id,
                tenant=trace.tenant,
                slo_class=trace.slo_class,
                model=info.model,
                pool="",
                instance_id="",
                gpu="",
                arrival_s=info.arrival_s - self.front_end.time_s(trace.input_tokens),
                dispatch_s=self.now_s,
                first_token_s=None,
                finish_s=None,
                input_tokens=trace.input_tokens,
                output_tokens=0,
                rejected=True,
                reject_reason=reason,
                ttft_slo_s=slo.ttft_slo_ms / 1000.0 if slo else math.inf,
                tpot_slo_s=slo.tpot_slo_ms / 1000.0 if slo else math.inf,
            )
        )

    # ------------------------------------------------------------ iterations
    def _start_iteration(self, inst: SimInstance, now: float) -> None:
        core = inst.core
        fast_forward = self.fast_forward
        batch = core.schedule_fast() if fast_forward else core.schedule()
        if not batch.scheduled and batch.cohort_decodes <= 0:  # batch.empty
            if core.has_work():
                raise RuntimeError(
                    f"{inst.state.instance_id}: engine has {core.num_waiting} waiting and "
                    f"{core.num_running} running requests but scheduled nothing"
                )
            return
        inst.iter_start_s = now
        run = core.plan_decode_run(batch, now) if fast_forward else None
        if run is not None:
            inst.run = run
            end = run.end_s
            if self.publish_progress:
                self.in_runs[inst.index] = inst
                inst.next_change_s = run.step_end_s(1)
                if inst.next_change_s < self.next_run_change_s:
                    self.next_run_change_s = inst.next_change_s
        else:
            inst.batch = batch
            end = now + batch.duration_s
        seq = self.seq = self.seq + 1
        heapq.heappush(self.heap, (end, seq, inst, inst.version))
        if self.live_load:
            if self.publish_progress:
                self._publish(inst)
            else:  # what _publish sets for policies that read no progress
                state = inst.state
                state.running = len(core.running)
                state.waiting = core.num_waiting
                state.kv_blocks_queued = core.waiting_blocks
                state.running_by_priority = core.running_by_priority

    def _cut_run(self, inst: SimInstance, now: float) -> None:
        """A request arrived while `inst` was inside a run: the next schedule must see it."""
        run = inst.run
        assert run is not None
        done = run.steps_done_by(now)
        if done + 1 < run.steps:
            run.truncate(done + 1)
            inst.version += 1
            self.seq += 1
            heapq.heappush(self.heap, (run.end_s, self.seq, inst, inst.version))

    def _iteration_end(self, inst: SimInstance, now: float) -> None:
        core = inst.core
        run = inst.run
        if run is not None:
            # KV block-seconds over the run (trapezoid over its steps: growth is near-linear)
            inst.kv_block_s += run.total_s * (2 * run.kv_blocks_used_start + run.later_blocks) / 2.0
            out = core.complete_run(run, now)
            inst.run = None
            if self.publish_progress:
                del self.in_runs[inst.index]
        else:
            batch = inst.batch
            assert batch is not None
            inst.kv_block_s += core.kv_blocks_used * batch.duration_s
            out = core.complete(batch, now)
            inst.batch = None
        inst.stats.busy_s += now - inst.iter_start_s
        if out.finished:
            state = inst.state
            instance_id = state.instance_id
            for req in out.finished:
                assert isinstance(req, SimRequest)
                self._record(req, inst)
                state.router_inflight -= 1
                assert req.policy is not None and req.info is not None
                req.policy.on_finish(req.info, instance_id)
        if core.has_work():
            self._start_iteration(inst, now)
        elif self.live_load:
            self._publish(inst)
        if out.finished and self.held:
            self._release_queue(now)  # capacity freed

    def _record(self, req: SimRequest, inst: SimInstance) -> None:
        self.finished += 1
        trace = req.trace
        info = req.info
        slo = req.slo
        assert trace is not None and info is not None
        # Requests reached the engine front_s after the client sent them (_through_front_end).
        front_s = self.front_end.time_s(req.prompt_tokens)
        self.records.append(
            RequestRecord(
                request_id=req.request_id,
                tenant=trace.tenant,
                slo_class=trace.slo_class,
                model=info.model,
                pool=inst.pool.name,
                instance_id=inst.state.instance_id,
                gpu=inst.pool.gpu.name,
                arrival_s=req.arrival_s - front_s,
                dispatch_s=req.dispatch_s,
                first_token_s=req.first_token_s,
                finish_s=req.finish_s,
                input_tokens=req.prompt_tokens,
                output_tokens=req.generated_tokens,
                cached_prompt_tokens=req.cached_prompt_tokens,
                preemptions=req.preemptions,
                ttft_slo_s=slo.ttft_slo_ms / 1000.0 if slo else math.inf,
                tpot_slo_s=slo.tpot_slo_ms / 1000.0 if slo else math.inf,
            )
        )

    # ------------------------------------------------------ load snapshots
    def _publish(self, inst: SimInstance, at_s: float | None = None) -> None:
        """Copy the engine's load into the snapshot dispatch reads (at `at_s` inside a run)."""
        state = inst.state
        core = inst.core
        run = inst.run
        state.running = len(core.running)
        state.waiting = core.num_waiting
        state.kv_blocks_queued = core.waiting_blocks
        state.running_by_priority = core.running_by_priority
        if not self.publish_progress:
            return  # no policy reads KV use, tokens in flight or the snapshot time
        if run is not None:
            done = run.steps_done_by(self.now_s if at_s is None else at_s)
            state.kv_blocks_used = run.kv_blocks_used_at(done)
            state.tokens_in_flight = run.tokens_in_flight_at(done)
            inst.next_change_s = run.step_end_s(done + 1) if done + 1 < run.steps else math.inf
        else:
            state.kv_blocks_used = core.kv_blocks_used
            state.tokens_in_flight = core.tokens_in_flight
        state.updated_s = self.now_s if at_s is None else at_s

    def _refresh_runs(self, now: float) -> None:
        if now < self.next_run_change_s:
            return  # no run has finished a step since the last refresh
        soonest = math.inf
        for inst in self.in_runs.values():
            if inst.next_change_s <= now:
                self._publish(inst, now)
            if inst.next_change_s < soonest:
                soonest = inst.next_change_s
        self.next_run_change_s = soonest

    def _scrape_until(self, next_scrape_s: float, t: float) -> float:
        """Refresh every snapshot as a router scraping at `next_scrape_s`, ... < t would."""
        interval = self.cluster.load_refresh_s
        # Nothing changes between events, so only the last scrape before `t` matters.
        ticks = math.ceil((t - next_scrape_s) / interval)
        last = next_scrape_s + (ticks - 1) * interval
        if last >= t:
            last -= interval
        last = max(last, next_scrape_s)
        for inst in self.instances:
            self._publish(inst, last)
        return last + interval

    def _sample_until(self, next_sample_s: float, t: float) -> float:
        interval = self.timeline_interval_s
        while next_sample_s < t:
            by_pool: dict[str, list[int | float]] = {}
            for inst in self.instances:
                run = inst.run
                core = inst.core
                if run is not None:
                    used = run.kv_blocks_used_at(run.steps_done_by(next_sample_s))
                else:
                    used = core.kv_blocks_used
                acc = by_pool.setdefault(inst.pool.name, [0, 0, 0.0, 0])
                acc[0] += len(core.running)
                acc[1] += core.num_waiting
                acc[2] += used / max(1, core.num_kv_blocks)
                acc[3] += 1
            for pool_name, (running, waiting, kv_sum, count) in by_pool.items():
                self.timeline.append(
                    TimelineSample(next_sample_s, pool_name, int(running), int(waiting), kv_sum / max(1, count))
                )
            next_sample_s += interval
        return next_sample_s


def _through_front_end(requests: Iterable[TraceRequest], front_end: FrontEndCost) -> Iterator[TraceRequest]:
    """The requests as they reach the engines, each `front_end.time_s(prompt)` after the client
    sent it (router, HTTP, tokenisation), in that order: a long prompt's tokenisation can let
    a later short one overtake it. Streams: a request is released once no later one can reach
    the engine before it (every later request was sent after the current one)."""
    if front_end.fixed_s == 0.0 and front_end.s_per_prompt_token == 0.0:
        yield from requests
        return
    pending: list[tuple[float, int, TraceRequest]] = []
    last_s = -math.inf
    for seq, req in enumerate(requests):
        if req.arrival_s < last_s:  # the loop's own check sees only the shifted times
            raise ValueError(
                f"trace is not sorted by arrival time: request {req.request_id!r} "
                f"arrives at {req.arrival_s} s, after one at {last_s} s"
            )
        last_s = req.arrival_s
        while pending and pending[0][0] <= req.arrival_s:
            yield heapq.heappop(pending)[2]
        reached_s = req.arrival_s + front_end.time_s(req.input_tokens)
        heapq.heappush(pending, (reached_s, seq, replace(req, arrival_s=reached_s)))
    while pending:
        yield heapq.heappop(pending)[2]


def simulate(
    cluster: ClusterSpec,
    requests: Iterable[TraceRequest],
    *,
    policy: DispatchPolicy | None = None,
    progress: ProgressFn | None = None,
    seed: int = 0,
    timeline_interval_s: float = 10.0,
    fast_forward: bool = True,
    total_requests: int = 0,
    tier_router: TierRouter | None = None,
    ranker: Callable[[TraceRequest], float | None] | None = None,
    tier_noise: TierNoise | None = None,
) -> SimResult:
    """Replay `requests` (sorted by arrival) on `cluster`; see the module docstring.

    policy: dispatch policy for every request (default: the cluster's, per SLO class).
    progress(sim_now_s, finished, total): called a few times per wall second at most;
        `total` is `total_requests` if given, else the requests seen so far.
    seed: seeds the dispatch policy's random choices.
    fast_forward: advance stretches of identical decode steps at once (same results).
    tier_router: decides the model of requests that name its alias (scheduler.tiers).
    ranker: gives each request's `predicted_rank` (sim.rank_noise: the real ranker for
        traces with prompts, a noise model of a chosen Kendall tau for those without).
    tier_noise: the tier scores of requests with neither a score nor a prompt
        (sim.tier_noise: a predictor of a chosen ROC AUC).
    """
    sim = Simulation(
        cluster,
        policy=policy,
        progress=progress,
        seed=seed,
        timeline_interval_s=timeline_interval_s,
        fast_forward=fast_forward,
        total_requests=total_requests,
        tier_router=tier_router,
        ranker=ranker,
        tier_noise=tier_noise,
    )
    return sim.run(requests)


def describe(result: SimResult) -> dict[str, Any]:
    """A few headline numbers of a run (for logs and quick checks; reports are sim.report)."""
    done = [r for r in result.records if not r.rejected]
    return {
        "policy": result.policy,
        "requests": len(result.records),
        "rejected": len(result.records) - len(done),
        "sim_s": result.end_s - result.start_s,
        "wall_s": result.wall_s,
        "events": result.events,
    }
