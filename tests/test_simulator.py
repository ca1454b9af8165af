"""The simulator: conservation and ordering properties on random workloads (hypothesis),
fast-forward equal to stepping, rejections, progress, timeline, load scraping."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.dispatch import ClusterView, DispatchPolicy
from scheduler.types import Decision, RequestInfo
from sim.cluster import ClusterSpec, parse_cluster, policy_variants
from sim.records import SimResult
from sim.simulator import Simulation, simulate
from sim.workload import TraceRequest


def cluster(policy: str = "least_outstanding", queue: str = "fcfs", blocks: int | None = 400,
            refresh_s: float = 0.0, **extra: Any) -> ClusterSpec:
    engine = {"block_size": 16, "max_num_seqs": 8, "max_num_batched_tokens": 512, "max_model_len": 4096}
    if blocks is not None:
        engine["num_kv_blocks"] = blocks
    doc = {
        "pools": [
            {"name": "big", "gpu": "A100-80GB", "model": "llama-3-8b", "count": 2, "engine": engine},
            {"name": "small", "gpu": "L4", "model": "llama-3-8b", "count": 2,
             "engine": {**engine, "num_kv_blocks": (blocks or 400) // 2}},
        ],
        "queue": {"policy": queue},
        "load_refresh_s": refresh_s,
        **extra,
    }
    spec = parse_cluster(doc, "test.yaml")
    return policy_variants(spec, [policy])[0]


def workload(seed: int, n: int, rate_per_s: float, prefix: bool = False) -> list[TraceRequest]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate_per_s)
        prompt = rng.randint(1, 900)
        hashes = (tuple(rng.randint(0, 3) for _ in range(1)) + tuple(10_000 * i + k for k in range(prompt // 32))
                  if prefix else ())
        out.append(TraceRequest(
            request_id=f"r{i}", arrival_s=t, input_tokens=prompt, output_tokens=rng.randint(1, 300),
            prefix_hashes=hashes[: prompt // 32], prefix_block_tokens=32,
            slo_class=rng.choice(["interactive", "default", "batch"]),
            session_id=f"s{rng.randint(0, 9)}",
        ))
    return out


class RecordingPolicy(DispatchPolicy):
    """Records the load every decision saw (to compare fast-forward with stepping)."""

    def decide(self, view: ClusterView, request: RequestInfo) -> Decision:
        self.seen.append(tuple(
            (s.running, s.waiting, s.kv_blocks_used, s.tokens_in_flight, s.router_inflight)
            for s in view.instances
        ))
        return super().decide(view, request)


def recording(spec: ClusterSpec) -> RecordingPolicy:
    built = spec.build_dispatch(seed=5)
    policy = RecordingPolicy(built.filters, built.scorers, built.picker, seed=5)
    policy.seen = []
    return policy


class CheckedSimulation(Simulation):
    """Checks the engine invariants and event order after every iteration end."""

    def _iteration_end(self, inst: Any, now: float) -> None:
        assert now >= self.last_event_s
        self.last_event_s = now
        super()._iteration_end(inst, now)
        inst.core.check_invariants()
        assert 0 <= inst.core.kv_blocks_used <= inst.core.num_kv_blocks
        assert inst.state.router_inflight == len(inst.core.requests)

    def _arrive(self, trace: TraceRequest) -> None:
        assert self.now_s >= self.last_event_s
        self.last_event_s = self.now_s
        super()._arrive(trace)


def run_checked(spec: ClusterSpec, requests: list[TraceRequest], fast_forward: bool) -> tuple[SimResult, Simulation]:
    sim = CheckedSimulation(spec, fast_forward=fast_forward, seed=5, policy=recording(spec))
    sim.last_event_s = -math.inf  # type: ignore[attr-defined]
    return sim.run(requests), sim


POLICIES = ["least_outstanding", "round_robin", "random", "least_kv", "power_of_two", "session_affinity",
            "prefix_affinity"]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 120), rate=st.sampled_from([2.0, 20.0, 200.0]),
       policy=st.sampled_from(POLICIES), queue=st.sampled_from(["fcfs", "slo_priority"]),
       blocks=st.sampled_from([120, 400, 3000]), prefix=st.booleans())
def test_conservation_and_fast_forward_equals_stepping(seed: int, n: int, rate: float, policy: str, queue: str,
                                                       blocks: int, prefix: bool) -> None:
    spec = cluster(policy, queue, blocks)
    requests = workload(seed, n, rate, prefix)
    stepped, step_sim = run_checked(spec, requests, fast_forward=False)
    fast, fast_sim = run_checked(spec, requests, fast_forward=True)
    for result, sim in ((stepped, step_sim), (fast, fast_sim)):
        by_id = {r.request_id: r for r in result.records}
        assert len(by_id) == len(result.records) == n  # every request finishes exactly once
        for req in requests:
            rec = by_id[req.request_id]
            assert not rec.rejected
            assert rec.output_tokens == req.output_tokens  # tokens generated == requested
            assert rec.arrival_s <= rec.first_token_s <= rec.finish_s  # type: ignore[operator]
        assert all(inst.state.router_inflight == 0 and not inst.core.has_work() for inst in sim.instances)
    # Every dispatch decision saw the same load in both modes (closed-form state inside runs).
    assert fast_sim.policy.seen == step_sim.policy.seen  # type: ignore[attr-defined]
    slow = {r.request_id: r for r in stepped.records}
    for rec in fast.records:
        ref = slow[rec.request_id]
        assert rec.instance_id == ref.instance_id
        assert rec.preemptions == ref.preemptions
        assert rec.cached_prompt_tokens == ref.cached_prompt_tokens
        assert abs(rec.first_token_s - ref.first_token_s) <= 1e-9  # type: ignore[operator]
        assert abs(rec.finish_s - ref.finish_s) <= 1e-9  # type: ignore[operator]
    for a, b in zip(step_sim.instances, fast_sim.instances, strict=True):
        assert a.core.iterations_total == b.core.iterations_total
        assert a.core.prefix_cache_hits_tokens == b.core.prefix_cache_hits_tokens
        assert a.core.prefix_cache_queries_tokens == b.core.prefix_cache_queries_tokens
        assert a.stats.busy_s == pytest.approx(b.stats.busy_s, abs=1e-6)
    assert fast.events <= stepped.events


def test_fast_forward_skips_most_events_on_a_real_sized_cluster() -> None:
    spec = cluster("least_outstanding", blocks=None)
    requests = workload(1, 400, 8.0)
    stepped = simulate(spec, requests, fast_forward=False)
    fast = simulate(spec, requests, fast_forward=True)
    assert fast.events * 3 < stepped.events
    assert [r.finish_s for r in fast.records] == pytest.approx([r.finish_s for r in stepped.records], abs=1e-9)


def test_scraped_load_is_stale_but_conserves_and_matches_between_modes() -> None:
    spec = cluster("least_kv", refresh_s=0.5)
    requests = workload(3, 150, 30.0)
    stepped, _ = run_checked(spec, requests, fast_forward=False)
    fast, _ = run_checked(spec, requests, fast_forward=True)
    assert [(r.instance_id, r.finish_s) for r in fast.records] == [
        (r.instance_id, pytest.approx(r.finish_s, abs=1e-9)) for r in stepped.records
    ]
    live = simulate(cluster("least_kv"), requests)
    # Stale KV usage between scrapes piles requests on the same instance: different choices.
    assert [r.instance_id for r in live.records] != [r.instance_id for r in fast.records]


def test_arrivals_are_streamed_not_materialised() -> None:
    pulled = []

    def stream() -> Iterator[TraceRequest]:
        for req in workload(4, 60, 5.0):
            pulled.append(req.request_id)
            yield req

    seen_when_first_finished: list[int] = []

    class Spy(Simulation):
        def _record(self, req: Any, inst: Any) -> None:
            if not seen_when_first_finished:
                seen_when_first_finished.append(len(pulled))
            super()._record(req, inst)

    Spy(cluster()).run(stream())
    assert len(pulled) == 60
    assert seen_when_first_finished[0] < 30  # the first record came long before the trace ended


def test_rejections_name_a_reason() -> None:
    spec = cluster()
    requests = [
        TraceRequest("too-long", 0.0, input_tokens=4000, output_tokens=500),
        TraceRequest("other-model", 0.1, input_tokens=10, output_tokens=5, model="llama-3-70b"),
        TraceRequest("ok", 0.2, input_tokens=10, output_tokens=5),
    ]
    result = simulate(spec, requests)
    by_id = {r.request_id: r for r in result.records}
    assert by_id["too-long"].rejected and "maximum context length" in by_id["too-long"].reject_reason
    assert by_id["other-model"].rejected and "filter 'model'" in by_id["other-model"].reject_reason
    assert not by_id["ok"].rejected and by_id["ok"].output_tokens == 5
    assert by_id["too-long"].first_token_s is None


def test_unsorted_trace_is_an_error_naming_the_request() -> None:
    requests = [TraceRequest("a", 5.0, 10, 5), TraceRequest("b", 1.0, 10, 5)]
    with pytest.raises(ValueError, match="'b' arrives at 1.0 s"):
        simulate(cluster(), requests)


def test_progress_timeline_stats_and_slo_fields() -> None:
    calls: list[tuple[float, int, int]] = []
    requests = workload(6, 200, 10.0)
    result = simulate(cluster(), requests, progress=lambda *a: calls.append(a), timeline_interval_s=2.0,
                      total_requests=200)
    assert calls and calls[-1][1:] == (200, 200)
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:], strict=False))
    pools = {s.pool for s in result.timeline}
    assert pools == {"big", "small"}
    times = sorted({s.t_s for s in result.timeline})
    assert times[0] == result.start_s and times[-1] <= result.end_s
    assert all(b - a == pytest.approx(2.0) for a, b in zip(times, times[1:], strict=False))
    assert any(s.running > 0 for s in result.timeline)
    assert all(0.0 <= s.kv_usage <= 1.0 for s in result.timeline)
    span = result.end_s - result.start_s
    for stats in result.instances:
        assert 0 < stats.busy_s <= span + 1e-9
        assert 0 <= stats.kv_usage_time_integral <= span
    assert sum(s.requests for s in result.instances) == 200
    inter = next(r for r in result.records if r.slo_class == "interactive")
    assert inter.ttft_slo_s == 1.0 and inter.tpot_slo_s == 0.1


def test_slo_priority_queue_serves_interactive_first_under_overload() -> None:
    rng = random.Random(9)
    requests = [TraceRequest(f"r{i}", i * 0.001, 800, 200, slo_class=rng.choice(["interactive", "batch"]))
                for i in range(300)]

    def mean_ttft(queue: str, cls: str) -> float:
        result = simulate(cluster("round_robin", queue), requests)
        ttfts = [r.ttft_s for r in result.records if r.slo_class == cls]
        return sum(ttfts) / len(ttfts)  # type: ignore[arg-type]

    assert mean_ttft("slo_priority", "interactive") < 0.5 * mean_ttft("slo_priority", "batch")
    assert mean_ttft("fcfs", "interactive") == pytest.approx(mean_ttft("fcfs", "batch"), rel=0.3)


def test_per_slo_class_dispatch_override() -> None:
    spec = parse_cluster({
        "pools": [{"name": "p", "gpu": "A100-80GB", "model": "llama-3-8b", "count": 3}],
        "dispatch": {"scorers": ["least_outstanding"],
                     "per_slo_class": {"batch": {"scorers": [], "picker": "round_robin"}}},
    }, "t.yaml")
    requests = [TraceRequest(f"b{i}", 0.0, 100, 500, slo_class="batch") for i in range(6)]
    result = simulate(spec, requests)
    placed = sorted((r.request_id, r.instance_id) for r in result.records)
    assert [i for _, i in placed] == ["p-0", "p-1", "p-2"] * 2


def test_prefix_affinity_reuses_more_kv_on_the_real_mooncake_trace(shared_data: Path) -> None:
    from sim.cluster import load_cluster
    from sim.traces import read_trace

    spec = load_cluster(Path(__file__).resolve().parents[1] / "sim" / "examples" / "slo_prefix_qwen.yaml")
    requests = list(read_trace(shared_data / "traces" / "mooncake" / "synthetic_trace.jsonl", limit=1500))
    hit_rate = {}
    for variant in policy_variants(spec, ["round_robin", "least_outstanding", "prefix_affinity"]):
        result = simulate(variant, requests)
        done = [r for r in result.records if not r.rejected]
        assert len(done) > 1200  # the rest exceed the 32k context and are rejected with a reason
        assert all("maximum context length" in r.reject_reason for r in result.records if r.rejected)
        hit_rate[variant.label] = sum(r.cached_prompt_tokens for r in done) / sum(r.input_tokens for r in done)
    assert hit_rate["prefix_affinity"] > 1.8 * max(hit_rate["round_robin"], hit_rate["least_outstanding"])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 120), rate=st.sampled_from([20.0, 200.0]),
       policy=st.sampled_from(["least_outstanding", "session_affinity", "power_of_two", "least_kv"]),
       fast_forward=st.booleans())
def test_skipping_in_stretch_refresh_changes_no_decision(seed: int, n: int, rate: float, policy: str,
                                                         fast_forward: bool) -> None:
    """Policies that read no in-stretch load (least_outstanding, affinity, ...) let the simulator
    skip refreshing KV use inside fast-forwarded stretches; records are those of a run that
    refreshes every snapshot before every decision."""
    spec = cluster(policy, "fcfs", 400)
    requests = workload(seed, n, rate, prefix=True)
    plain = Simulation(spec, seed=5, fast_forward=fast_forward, policy=spec.build_dispatch(seed=5))
    assert plain.publish_progress == (policy == "least_kv")
    forced = Simulation(spec, seed=5, fast_forward=fast_forward, policy=spec.build_dispatch(seed=5))
    forced.publish_progress = True
    a, b = plain.run(requests), forced.run(requests)
    assert [dataclasses.astuple(r) for r in a.records] == [dataclasses.astuple(r) for r in b.records]
    assert recording(spec).reads_progress  # a policy overriding decide may read anything
