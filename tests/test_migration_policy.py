"""The migration policy (scheduler/migration.py), its router control loop (router/
migration_loop.py, against real engines) and its simulator driver (sim/migration.py)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.migration_loop import MigrationLoop, load_of
from scheduler.migration import (
    BlockedHeadRelief,
    MigrationCandidate,
    MigrationLoad,
    MigrationPolicyError,
    build_migration_policy,
)
from scheduler.priority_headroom import NO_HEADROOM, PriorityHeadroom
from scheduler.types import InstanceState
from sim.engine_http import EngineServer
from tests.test_migration import MODEL, engine
from tests.test_migration_router import chat_body, parse, records, reference, sse
from tests.test_router_support import running_router


def load(instance_id: str, used: int, total: int = 1000, **extra: Any) -> MigrationLoad:
    return MigrationLoad(instance_id=instance_id, model=MODEL, kv_blocks_total=total, kv_blocks_used=used,
                         running=extra.pop("running", 10), **extra)


def test_a_source_is_an_instance_whose_queue_head_cannot_be_admitted() -> None:
    # A flat guard here (guard_blocks_per_decode=0); the per-decode guard has its own test.
    policy = BlockedHeadRelief(preempt_guard_blocks=8, destination_reserve_blocks=16, guard_blocks_per_decode=0)
    # a: 950 used, head 60 -> needs 60 + 8, has 50 free: deficit 18. b: full KV but nothing
    # waits: not a source (usage alone moves nothing). c: head fits with the guard.
    a = load("a", 950, head_of_line_blocks=60, waiting=1)
    b = load("b", 990)
    c = load("c", 900, head_of_line_blocks=50, waiting=2)
    assert [policy.deficit_blocks(x) for x in (a, b, c)] == [18, 0, 0]
    d = load("d", 500)
    e = load("e", 100, migrating=True)
    pairs = policy.pairs([a, b, c, d, e])
    assert [(p.source_id, p.destination_id, p.reason) for p in pairs] == [("a", "d", "load")]
    # The guard counts: without it, `a`'s head (60 blocks) would still not fit in 50.
    unguarded = BlockedHeadRelief(preempt_guard_blocks=0, guard_blocks_per_decode=0)
    assert unguarded.deficit_blocks(a) == 10
    assert unguarded.deficit_blocks(load("x", 900, head_of_line_blocks=60, waiting=1)) == 0
    # No destination with room: no pair (everyone full is not migration's to fix).
    assert policy.pairs([a, load("f", 985), load("g", 970, head_of_line_blocks=10, waiting=1)]) == []


def test_decodes_about_to_run_out_of_blocks_make_a_source_too() -> None:
    # Nothing waits, but 4 free blocks for 10 growing decodes: the engine would soon preempt.
    policy = BlockedHeadRelief(preempt_guard_blocks=8, destination_reserve_blocks=0, grow_room_blocks=0,
                               guard_blocks_per_decode=0)
    tight = load("tight", 996, running=10)
    assert policy.deficit_blocks(tight) == 4
    assert policy.deficit_blocks(load("idle", 996, running=0)) == 0  # nothing to grow
    assert policy.deficit_blocks(load("roomy", 992, running=10)) == 0
    # A destination keeps at least the guard free, so it never becomes a source by a move.
    assert policy.room_blocks(load("d", 900)) == 100 - 8
    orders = policy.plan([tight, load("d", 900)], lambda iid: [MigrationCandidate("r", 16 * 5)], 16)
    assert [(o.source_id, o.destination_id) for o in orders] == [("tight", "d")]


def test_the_guard_grows_with_the_running_decodes() -> None:
    # 40 decodes cross into a new block every 16 steps each: 8 flat blocks last one step or
    # so of that batch; one block per decode (the default) lasts 16. The queue head counts
    # as one more decode once admitted.
    policy = BlockedHeadRelief(preempt_guard_blocks=8, destination_reserve_blocks=16, grow_room_blocks=0)
    assert policy.guard_blocks(load("few", 0, running=3)) == 8  # never below preempt_guard_blocks
    assert policy.guard_blocks(load("many", 0, running=40)) == 40
    assert BlockedHeadRelief(guard_blocks_per_decode=0.5).guard_blocks(load("half", 0, running=41)) == 21
    # Head 30, 960 used (40 free): a flat guard of 8 sees no deficit; 41 decodes after the
    # head's admission need 41 free blocks: deficit 30 + 41 - 40 = 31.
    busy = load("busy", 960, head_of_line_blocks=30, waiting=1, running=40)
    assert BlockedHeadRelief(preempt_guard_blocks=8, guard_blocks_per_decode=0).deficit_blocks(busy) == 0
    assert policy.deficit_blocks(busy) == 31
    # Nothing queued: 40 decodes with 30 free lack 10.
    assert policy.deficit_blocks(load("tight", 970, running=40)) == 10
    # A destination keeps the guard of its decodes plus the mover: 40 running + 1 -> 41
    # (above the reserve of 16), so what it takes in never makes it a source.
    dest = load("d", 800, running=40)
    assert policy.room_blocks(dest) == 200 - 41
    mover = MigrationCandidate("m", 16 * policy.room_blocks(dest))
    after = load("d", 800 + policy.room_blocks(dest), running=41)
    assert policy.deficit_blocks(after) == 0
    assert policy.choose(busy, dest, [mover], 16) == mover
    with pytest.raises(MigrationPolicyError, match="guard_blocks_per_decode"):
        BlockedHeadRelief(guard_blocks_per_decode=-1)


def test_a_destination_keeps_its_reserve_and_its_own_head() -> None:
    policy = BlockedHeadRelief(preempt_guard_blocks=0, destination_reserve_blocks=16, grow_room_blocks=4)
    source = load("s", 990, head_of_line_blocks=40, waiting=1)  # deficit 30
    # 1000 - 900 free = 100; own head 50 waits: room 100 - 50 - 16 - 4 = 30.
    dest = load("d", 900, head_of_line_blocks=50, waiting=1)
    assert policy.room_blocks(dest) == 30
    fits = MigrationCandidate("fits", 16 * 30)
    too_big = MigrationCandidate("big", 16 * 31)
    assert policy.choose(source, dest, [too_big, fits], 16) == fits
    assert policy.choose(source, dest, [too_big], 16) is None


def test_chooses_the_cheapest_move_that_admits_the_head() -> None:
    policy = BlockedHeadRelief(preempt_guard_blocks=0, destination_reserve_blocks=0, high_priority_below=1,
                               guard_blocks_per_decode=0)
    source = load("s", 990, head_of_line_blocks=70, waiting=3)  # deficit 60
    destination = load("d", 100)
    cands = [MigrationCandidate("tiny", 16 * 10, priority=2), MigrationCandidate("enough", 16 * 60, priority=2),
             MigrationCandidate("more", 16 * 200, priority=2), MigrationCandidate("vip", 16 * 61, priority=0)]
    chosen = policy.choose(source, destination, cands, 16)
    assert chosen is not None and chosen.request_id == "enough"  # vip stays; tiny leaves the head blocked
    # When no single request frees the whole deficit, the one that frees the most moves
    # (the next tick moves another).
    small = [MigrationCandidate("tiny", 16 * 10, priority=2), MigrationCandidate("half", 16 * 30, priority=2)]
    chosen = policy.choose(source, destination, small, 16)
    assert chosen is not None and chosen.request_id == "half"
    # Lower priority classes go first, whatever their size.
    mixed = [MigrationCandidate("p1", 16 * 60, priority=1), MigrationCandidate("p3", 16 * 150, priority=3)]
    chosen = policy.choose(source, destination, mixed, 16)
    assert chosen is not None and chosen.request_id == "p3"


def test_assign_tries_the_next_destination_when_the_roomiest_fits_nothing() -> None:
    policy = BlockedHeadRelief(preempt_guard_blocks=0, destination_reserve_blocks=0, grow_room_blocks=0,
                               guard_blocks_per_decode=0)
    s1 = load("s1", 995, head_of_line_blocks=30, waiting=1)  # deficit 25
    s2 = load("s2", 990, head_of_line_blocks=15, waiting=1)  # deficit 5
    d1, d2 = load("d1", 900), load("d2", 960)  # room 100 and 40
    cands = {"s1": [MigrationCandidate("big", 16 * 90)], "s2": [MigrationCandidate("one", 16 * 35)]}
    assert policy.sources([s1, s2, d1, d2]) == ["s1", "s2"]
    orders = policy.assign([s1, s2, d1, d2], cands, 16)
    assert [(o.request_id, o.source_id, o.destination_id) for o in orders] == [("big", "s1", "d1"),
                                                                              ("one", "s2", "d2")]
    # s2's request does not fit d2; it takes d1 when s1 has none to move.
    cands = {"s1": [], "s2": [MigrationCandidate("two", 16 * 60)]}
    orders = policy.assign([s1, s2, d1, d2], cands, 16)
    assert [(o.request_id, o.source_id, o.destination_id) for o in orders] == [("two", "s2", "d1")]
    # min_usage_gap: a destination must be that much less loaded.
    strict = BlockedHeadRelief(preempt_guard_blocks=0, destination_reserve_blocks=0, grow_room_blocks=0,
                               min_usage_gap=0.1, guard_blocks_per_decode=0)
    orders = strict.assign([s1, s2, d1, d2], {"s1": [MigrationCandidate("big", 16 * 90)]}, 16)
    assert [(o.source_id, o.destination_id) for o in orders] == [("s1", "d1")]  # d2 is within 0.1 of s1
    assert strict.assign([s1, d2], {"s1": [MigrationCandidate("small", 16 * 30)]}, 16) == []


def test_draining_instances_move_everything_even_high_priority() -> None:
    policy = BlockedHeadRelief(high_priority_below=1)
    draining = load("old", 10, draining=True, running=1)
    pairs = policy.pairs([draining, load("new", 500)])
    assert [(p.source_id, p.destination_id, p.reason) for p in pairs] == [("old", "new", "drain")]
    chosen = policy.choose(draining, load("new", 500), [MigrationCandidate("vip", 100, priority=0)], 16)
    assert chosen is not None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 300), st.booleans(), st.booleans(),
                          st.lists(st.integers(1, 400), max_size=4)),
                min_size=1, max_size=12),
       st.integers(0, 32), st.integers(0, 64), st.sampled_from([0.0, 0.05, 0.3]))
def test_every_order_admits_help_and_fits(raw: list[tuple[int, int, bool, bool, list[int]]], guard: int,
                                          reserve: int, gap: float) -> None:
    policy = BlockedHeadRelief(preempt_guard_blocks=guard, destination_reserve_blocks=reserve, min_usage_gap=gap)
    loads = [load(f"i{k}", used, head_of_line_blocks=head, waiting=1 if head else 0, draining=draining,
                  migrating=busy) for k, (used, head, draining, busy, _) in enumerate(raw)]
    cands = {f"i{k}": [MigrationCandidate(f"i{k}-{j}", 16 * b) for j, b in enumerate(sizes)]
             for k, (*_, sizes) in enumerate(raw)}
    orders = policy.assign(loads, cands, 16)
    ids = [o.source_id for o in orders] + [o.destination_id for o in orders]
    assert len(ids) == len(set(ids))  # at most one migration per instance
    by_id = {ld.instance_id: ld for ld in loads}
    for order in orders:
        source, destination = by_id[order.source_id], by_id[order.destination_id]
        assert not (source.migrating or destination.migrating or destination.draining)
        assert order.request_id.startswith(order.source_id + "-")
        assert source.draining or policy.deficit_blocks(source) > 0  # only a blocked head is a reason
        blocks = -(-order.context_tokens // 16)
        if not source.draining:
            assert blocks <= policy.room_blocks(destination)  # the destination keeps its reserve
    # plan() is sources + assign, as the router's loop runs them
    assert policy.plan(loads, lambda iid: cands[iid], 16) == orders


def test_bad_config_says_what_and_where() -> None:
    with pytest.raises(MigrationPolicyError, match="unknown 'teleport'"):
        build_migration_policy({"policy": "teleport"})
    with pytest.raises(MigrationPolicyError, match="overload_usage: no longer a parameter.*preempt_guard_blocks"):
        build_migration_policy({"policy": "llumnix", "overload_usage": 0.5, "underload_usage": 0.3})
    with pytest.raises(MigrationPolicyError, match="migration: .*unexpected keyword"):
        build_migration_policy({"policy": "llumnix", "speed": 3})
    with pytest.raises(MigrationPolicyError, match="destination_reserve_blocks: expected an integer >= 0"):
        build_migration_policy({"policy": "llumnix", "destination_reserve_blocks": -1})
    assert build_migration_policy(None).pairs([load("a", 999)]) == []


def test_virtual_usage_dispatch_prefers_the_instance_with_the_shorter_queue() -> None:
    from scheduler.dispatch import ClusterView, build_policy
    from scheduler.types import RequestInfo

    policy = build_policy({"filters": ["model"], "scorers": ["least_virtual_usage"], "picker": "max_score"})
    # Same KV in use; "queued" has three requests waiting for room, so it is the busier one.
    queued = InstanceState(instance_id="queued", model=MODEL, running=5, waiting=3, kv_blocks_used=500,
                           kv_blocks_total=1000)
    calm = InstanceState(instance_id="calm", model=MODEL, running=5, waiting=0, kv_blocks_used=600,
                         kv_blocks_total=1000)
    decision = policy.decide(ClusterView([queued, calm]), RequestInfo("r", MODEL, 100))
    assert decision.instance_ids[0] == "calm"  # 0.6 virtual usage against 0.5 + 3 x 100 / 1000
    # Scores stay in (0, 1] and apart when the queue takes virtual usage past 1; ids sort
    # against the expected order, since equal scores go in id order (negative scores were
    # clamped to 0, all ties, and every request went to the first instance by id).
    swamped = InstanceState(instance_id="a-swamped", model=MODEL, running=30, waiting=200, kv_blocks_used=990,
                            kv_blocks_total=1000)
    busy = InstanceState(instance_id="b-busy", model=MODEL, running=5, waiting=3, kv_blocks_used=500,
                         kv_blocks_total=1000)
    idle = InstanceState(instance_id="c-idle", model=MODEL, kv_blocks_total=1000)
    decision = policy.decide(ClusterView([swamped, busy, idle]), RequestInfo("r", MODEL, 100))
    assert decision.instance_ids == ("c-idle", "b-busy", "a-swamped"), decision


def test_load_of_estimates_queued_demand_from_what_the_router_sees() -> None:
    state = InstanceState(instance_id="a", model=MODEL, running=4, waiting=2, tokens_in_flight=4000,
                          kv_blocks_used=300, kv_blocks_total=400, block_size_tokens=16)

    def load(headroom: PriorityHeadroom = NO_HEADROOM) -> MigrationLoad:
        return load_of(state, draining=False, migrating=False, headroom=headroom)

    assert load().head_of_line_blocks == 63  # 1000 tokens / 16
    # An engine that reports its queued demand bounds the head's: it cannot need more.
    state.kv_blocks_queued = 20
    assert load().head_of_line_blocks == 20
    state.waiting, state.kv_blocks_queued = 1, 90  # one request queued: its blocks are the whole demand
    assert load().head_of_line_blocks == 90
    # High-priority running requests: counted from the engine's report by the policy's
    # threshold; none when the engine does not report them.
    headroom = PriorityHeadroom(blocks_per_request=10, high_priority_below=1)
    assert load(headroom).high_priority_running == 0
    state.running_by_priority = ((-1, 1), (0, 2), (1, 1))
    assert load(headroom).high_priority_running == 3
    assert NO_HEADROOM.blocks(load().high_priority_running) == 0  # no headroom kept by default
    assert load(PriorityHeadroom(10, high_priority_below=2)).high_priority_running == 4


def test_virtual_usage_counts_the_queued_demand_the_driver_reports() -> None:
    from scheduler.dispatch import ClusterView, build_policy
    from scheduler.policies.virtual_usage import virtual_usage
    from scheduler.types import RequestInfo

    policy = build_policy({"filters": ["model"], "scorers": ["least_virtual_usage"], "picker": "max_score"})
    # Three short prompts wait on "short-queue" (30 blocks in all); "long-running" queues
    # nothing but holds more. Estimated from the mean running request (100 blocks each), the
    # queue looks like 300 blocks and "short-queue" the busier; counted, it is the lighter.
    short = InstanceState(instance_id="short-queue", model=MODEL, running=5, waiting=3, kv_blocks_used=500,
                          kv_blocks_total=1000)
    long = InstanceState(instance_id="long-running", model=MODEL, running=5, kv_blocks_used=600,
                         kv_blocks_total=1000, kv_blocks_queued=0)
    assert virtual_usage(short) == pytest.approx(0.8)  # estimated: 500 + 3 x 100
    assert policy.decide(ClusterView([short, long]), RequestInfo("r", MODEL, 100)).instance_ids[0] == "long-running"
    short.kv_blocks_queued = 30
    assert virtual_usage(short) == pytest.approx(0.53)
    assert policy.decide(ClusterView([short, long]), RequestInfo("r", MODEL, 100)).instance_ids[0] == "short-queue"
    # A reported 0 with requests waiting (all admitted since the last snapshot) is taken as it is.
    assert virtual_usage(InstanceState(instance_id="x", model=MODEL, running=2, waiting=4, kv_blocks_used=100,
                                       kv_blocks_total=1000, kv_blocks_queued=0)) == pytest.approx(0.1)


def test_virtual_usage_keeps_headroom_for_high_priority_requests_in_dispatch_and_migration() -> None:
    """One headroom term (scheduler/priority_headroom.py) in both consumers: dispatch's
    `least_virtual_usage` and the migration policy's measure and deficit."""
    from scheduler.dispatch import ClusterView, build_policy
    from scheduler.policies.virtual_usage import virtual_usage
    from scheduler.types import RequestInfo

    # "interactive" runs 4 requests of priority 0 and holds fewer blocks; "batch" runs 4
    # of priority 2. Without headroom "interactive" is the lighter; with 50 blocks kept per
    # high-priority request (priority < 1) it counts 200 more and the arrival goes to "batch".
    interactive = InstanceState(instance_id="interactive", model=MODEL, running=4, kv_blocks_used=400,
                                kv_blocks_total=1000, kv_blocks_queued=0, running_by_priority=((0, 4),))
    batch = InstanceState(instance_id="batch", model=MODEL, running=4, kv_blocks_used=500, kv_blocks_total=1000,
                          kv_blocks_queued=0, running_by_priority=((2, 4),))
    headroom = PriorityHeadroom(blocks_per_request=50, high_priority_below=1)
    assert virtual_usage(interactive) == pytest.approx(0.4)
    assert virtual_usage(interactive, headroom) == pytest.approx(0.6)
    assert virtual_usage(batch, headroom) == pytest.approx(0.5)
    request = RequestInfo("r", MODEL, 100)
    plain = build_policy({"filters": ["model"], "scorers": ["least_virtual_usage"]})
    kept = build_policy({"filters": ["model"], "scorers": [
        {"least_virtual_usage": {"priority_headroom_blocks": 50, "high_priority_below": 1}}]})
    assert plain.decide(ClusterView([interactive, batch]), request).instance_ids[0] == "interactive"
    assert kept.decide(ClusterView([interactive, batch]), request).instance_ids[0] == "batch"
    # Unknown counts (a /metrics scrape) keep no headroom: today's measure.
    interactive.running_by_priority = None
    assert virtual_usage(interactive, headroom) == pytest.approx(0.4)
    # The migration policy reads the same term: its virtual usage and its deficit.
    policy = BlockedHeadRelief(priority_headroom_blocks=50, high_priority_below=1, preempt_guard_blocks=0,
                               guard_blocks_per_decode=0)
    assert policy.headroom == headroom
    load = MigrationLoad("i", MODEL, 1000, 400, running=4, high_priority_running=4)
    assert policy.virtual_usage(load) == pytest.approx(0.6)
    assert policy.deficit_blocks(MigrationLoad("i", MODEL, 1000, 850, running=4, high_priority_running=4)) == 50


def test_the_policy_document_gives_dispatch_the_migration_sections_headroom() -> None:
    from scheduler.policy_document import PolicyDocumentError, load_policy_document

    params = {"priority_headroom_blocks": 32, "high_priority_below": 1}
    doc = load_policy_document({"migration": {"params": params}, "profiles": {
        "default": {"scorers": ["least_virtual_usage"]},
        "own": {"scorers": [{"least_virtual_usage": {"weight": 2, "priority_headroom_blocks": 8}}]}}})
    policies = doc.build_profiles()
    assert policies["default"].scorers[0][0].headroom == PriorityHeadroom(32, 1)  # type: ignore[attr-defined]
    assert policies["own"].scorers[0][0].headroom == PriorityHeadroom(8, 1)  # type: ignore[attr-defined]
    assert doc.migration.build_policy().headroom == PriorityHeadroom(32, 1)
    # The default document keeps no headroom anywhere (the measure before the term).
    default = load_policy_document({"profiles": {"default": {"scorers": ["least_virtual_usage"]}}})
    assert default.build_profiles()["default"].scorers[0][0].headroom == NO_HEADROOM  # type: ignore[attr-defined]
    bad = [({"scorers": [{"least_virtual_usage": {"priority_headroom_blocks": -1}}]},
            "profiles.default.scorers[0].least_virtual_usage.priority_headroom_blocks: Input should be greater"),
           ({"scorers": [{"least_virtual_usage": {"high_priority_below": "high"}}]},
            "profiles.default.scorers[0].least_virtual_usage.high_priority_below: Input should be a valid integer"),
           ({"scorers": [{"least_virtual_usage": {"headroom": 4}}]},
            "least_virtual_usage.headroom: unknown key; allowed: high_priority_below, priority_headroom_blocks")]
    for profile, message in bad:
        with pytest.raises(PolicyDocumentError) as info:
            load_policy_document({"profiles": {"default": profile}})
        assert message in str(info.value), str(info.value)
    with pytest.raises(PolicyDocumentError, match=r"migration\.params\.priority_headroom_blocks"):
        load_policy_document({"migration": {"params": {"priority_headroom_blocks": -4}}})


def test_the_simulator_publishes_priority_counts_and_its_dispatch_keeps_the_headroom() -> None:
    """The simulator's driver side of the headroom: every decision sees each instance's
    running requests per priority class (as its core has them), and with a headroom set
    the same trace is placed differently."""
    import random

    from scheduler.dispatch import ClusterView, DispatchPolicy
    from scheduler.types import Decision, RequestInfo
    from sim.cluster import parse_cluster
    from sim.simulator import Simulation
    from sim.workload import TraceRequest

    rng = random.Random(7)
    trace = [TraceRequest(f"r{i}", i * 0.05, rng.randint(50, 900), rng.randint(20, 200),
                          slo_class=rng.choice(["interactive", "batch"])) for i in range(300)]

    def placed(headroom_blocks: int) -> tuple[list[str], list[tuple[int, Any]]]:
        engine = {"block_size": 16, "max_num_seqs": 16, "num_kv_blocks": 600}
        doc = {"pools": [{"name": "a", "gpu": "L4", "model": MODEL, "count": 3, "engine": engine}],
               "load_refresh_s": 0,
               "policy": {"queue": {"engine_priority": "slo_priority"}, "window": {"max_candidates": 0},
                          "profiles": {"default": {"scorers": ["least_virtual_usage"]}},
                          "migration": {"params": {"priority_headroom_blocks": headroom_blocks,
                                                   "high_priority_below": 1}}}}
        spec = parse_cluster(doc, "headroom.yaml")
        seen: list[tuple[int, Any]] = []
        chosen: list[str] = []

        class Recording(DispatchPolicy):
            def decide(self, view: ClusterView, request: RequestInfo) -> Decision:
                seen.extend((s.running, s.running_by_priority) for s in view.instances)
                decision = super().decide(view, request)
                chosen.append(decision.instance_id)
                return decision

        built = spec.build_dispatch(seed=1)
        result = Simulation(spec, seed=1, policy=Recording(built.filters, built.scorers, built.picker, seed=1)).run(trace)
        assert len(result.records) == len(trace)
        return chosen, seen

    plain, seen = placed(0)
    # The counts describe the running batch the decision sees, both classes among them.
    bad = [(running, counts) for running, counts in seen
           if (counts is None and running) or sum(n for _, n in counts or ()) != running]
    assert not bad, bad[:5]
    assert any(dict(counts or ()).get(0, 0) and dict(counts or ()).get(2, 0) for _, counts in seen)
    kept, _ = placed(40)
    assert kept != plain  # 40 blocks per running interactive request move arrivals elsewhere


def test_the_router_reads_the_priority_counts_of_a_snapshot_within_bounds() -> None:
    from router.worker_client import running_by_priority_of
    from scheduler.priority_headroom import MAX_PRIORITY_CLASSES
    from tokenyard.v1 import worker_pb2

    assert running_by_priority_of(worker_pb2.LoadSnapshot(running=3)) is None  # not reported
    reported = worker_pb2.LoadSnapshot(running=3, running_by_priority=worker_pb2.RunningByPriority(
        requests={2: 1, -1: 2, 5: 0}))
    assert running_by_priority_of(reported) == ((-1, 2), (2, 1))
    assert running_by_priority_of(worker_pb2.LoadSnapshot(
        running_by_priority=worker_pb2.RunningByPriority())) == ()  # reported: nothing running
    flood = worker_pb2.LoadSnapshot(running_by_priority=worker_pb2.RunningByPriority(
        requests={k: 1 for k in range(MAX_PRIORITY_CLASSES + 1)}))
    assert running_by_priority_of(flood) is None


async def test_the_router_loop_drains_an_instance_by_moving_its_stream() -> None:
    servers = [EngineServer(engine(name), "127.0.0.1", 0, grpc_port=0) for name in ("a", "b")]
    for server in servers:
        await server.start()
    expected, usage = await reference(chat_body())
    try:
        async with running_router(records(servers)) as server, httpx.AsyncClient(timeout=30) as client:
            loop = MigrationLoop(server.router.registry, BlockedHeadRelief(), interval_s=0.05)
            lines: list[str] = []
            async with client.stream("POST", server.url + "/v1/chat/completions", json=chat_body()) as response:
                first = response.headers["x-tokenyard-instance"]
                other = "b" if first == "a" else "a"
                async for line in sse(response):
                    lines.append(line)
                    if len(lines) == 10:
                        # Scale-down of `first`: mark it draining; the loop moves its stream.
                        for name, srv in zip(("a", "b"), servers, strict=True):
                            core = srv.engine.core
                            server.router.registry.update_load(name, running=core.num_running,
                                                               kv_blocks_used=core.kv_blocks_used,
                                                               kv_blocks_total=core.num_kv_blocks)
                        server.router.registry.set_draining(first, True)
                        orders = await loop.tick()
                        assert [(o.source_id, o.destination_id, o.reason) for o in orders] == [(first, other, "drain")]
                        assert await loop.tick() == []  # both are busy with that move
            await loop.wait_moves()
            texts, got_usage, ids = parse(lines)
            assert texts == expected and got_usage == usage and len(ids) == 1
            assert loop.stats.committed == 1 and server.router.splicer.stats.migrations_spliced == 1
            await loop.stop()
    finally:
        for srv in servers:
            await srv.stop()


def test_the_simulator_moves_requests_and_keeps_every_token() -> None:
    from scheduler.migration import build_migration_policy
    from sim.cluster import parse_cluster
    from sim.migration import MigrationSimConfig
    from sim.simulator import Simulation
    from sim.workload import TraceRequest

    doc = {"default_model": MODEL, "pools": [{"name": "l4", "gpu": "L4", "model": MODEL, "count": 4,
                                              "engine": {"max_num_seqs": 64}}],
           "dispatch": {"filters": ["model"], "scorers": ["least_outstanding"], "picker": "round_robin"}}
    cluster = parse_cluster(doc, "test")
    # Long answers land round-robin on the first two instances; short ones finish fast on the others.
    trace = [TraceRequest(request_id=f"r{i}", arrival_s=i * 0.05, input_tokens=2000,
                          output_tokens=600 if i % 4 < 2 else 5) for i in range(120)]
    config = MigrationSimConfig(policy=build_migration_policy({"policy": "llumnix"}), link_gbps=50)
    sim = Simulation(cluster, migration=config)
    result = sim.run(trace)
    assert sim.migration is not None and sim.migration.stats.committed > 0, sim.migration.stats.summary()
    by_id = {r.request_id: r for r in result.records}
    assert len(by_id) == len(trace)
    for req in trace:  # every request finished once, with all its tokens
        assert by_id[req.request_id].output_tokens == req.output_tokens
    for inst in sim.instances:
        inst.core.check_invariants()
        assert inst.core.kv.reserved_blocks == 0 and not inst.core.requests
    downtime = sim.migration.stats.summary()["downtime_p99_ms"]
    assert 0 < downtime < 50
    assert json.dumps(sim.migration.stats.summary())
