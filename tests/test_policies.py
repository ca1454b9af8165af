"""Each baseline dispatch policy behaves as named, on constructed cluster states; queue
policies give the priorities they promise."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.dispatch import ClusterView, DispatchPolicy, build_policy
from scheduler.dispatch_parts import DispatchContext, PolicyConfigError, Scorer
from scheduler.queue_orders import build_queue_policy
from scheduler.queueing import QueuePolicyError
from scheduler.types import InstanceState, NoInstanceAvailable, RequestInfo, SloClass

MODEL = "llama-3-8b"


def instances(*loads: int, kv: tuple[float, ...] | None = None) -> list[InstanceState]:
    out = []
    for i, load in enumerate(loads):
        state = InstanceState(instance_id=f"i{i}", model=MODEL, router_inflight=load,
                              kv_blocks_total=1000)
        if kv is not None:
            state.kv_blocks_used = int(kv[i] * 1000)
        out.append(state)
    return out


def request(n: int = 0, session: str | None = None, prefix: tuple[int, ...] = ()) -> RequestInfo:
    return RequestInfo(request_id=f"r{n}", model=MODEL, input_tokens=100, session_id=session,
                       prefix_hashes=prefix)


def dispatch(policy: DispatchPolicy, insts: list[InstanceState], req: RequestInfo) -> str:
    """Decide and report the dispatch, as drivers do; the chosen instance's load goes up."""
    chosen = policy.decide(ClusterView(insts), req).instance_id
    policy.on_dispatch(req, chosen)
    next(i for i in insts if i.instance_id == chosen).router_inflight += 1
    return chosen


def test_round_robin_cycles_in_id_order_and_survives_a_filtered_instance() -> None:
    policy = build_policy({"scorers": [], "picker": "round_robin"})
    insts = instances(0, 0, 0)
    assert [dispatch(policy, insts, request(n)) for n in range(6)] == ["i0", "i1", "i2"] * 2
    insts[1].healthy = False
    assert [dispatch(policy, insts, request(n)) for n in range(4)] == ["i0", "i2", "i0", "i2"]


def test_random_is_seeded_and_covers_every_instance() -> None:
    insts = instances(0, 0, 0, 0)

    def picks(seed: int, count: int) -> list[str]:
        policy = build_policy({"picker": "random"}, seed=seed)
        return [policy.decide(ClusterView(insts), request(n)).instance_id for n in range(count)]

    many = Counter(picks(7, 400))
    assert set(many) == {"i0", "i1", "i2", "i3"}
    assert min(many.values()) > 50  # roughly uniform, not stuck
    assert picks(7, 20) == picks(7, 20)  # reproducible from the seed
    assert picks(7, 20) != picks(8, 20)


def test_least_outstanding_picks_the_least_loaded() -> None:
    policy = build_policy({"scorers": ["least_outstanding"]})
    insts = instances(5, 2, 9)
    insts[2].running = 0
    assert policy.decide(ClusterView(insts), request()).instance_ids == ("i1", "i0", "i2")
    # Scraped load larger than the router's count wins.
    insts[1].running, insts[1].waiting = 10, 3
    assert policy.decide(ClusterView(insts), request()).instance_id == "i0"


def test_least_kv_picks_the_lowest_kv_usage_even_with_more_requests() -> None:
    policy = build_policy({"scorers": ["least_kv"]})
    insts = instances(1, 8, 3, kv=(0.7, 0.2, 0.5))
    assert policy.decide(ClusterView(insts), request()).instance_ids == ("i1", "i2", "i0")
    # Equal usage: fewer outstanding requests breaks the tie.
    insts = instances(4, 1, 3, kv=(0.5, 0.5, 0.5))
    assert policy.decide(ClusterView(insts), request()).instance_id == "i1"


def test_power_of_two_never_picks_the_worst_and_is_not_plain_least_load() -> None:
    policy = build_policy({"scorers": ["least_outstanding"], "picker": "power_of_two"}, seed=3)
    insts = instances(0, 1, 2, 3, 4, 5, 6, 7)
    picks = Counter(policy.decide(ClusterView(insts), request(n)).instance_id for n in range(500))
    assert "i7" not in picks  # the worst loses against any other sampled instance
    assert picks["i0"] > picks["i6"]  # better instances win more often
    assert len(picks) >= 5  # but it is two random choices, not a global minimum
    two = instances(3, 1)
    assert all(policy.decide(ClusterView(two), request(n)).instance_id == "i1" for n in range(20))


def test_session_affinity_keeps_sessions_and_moves_few_on_membership_change() -> None:
    policy = build_policy({"scorers": ["least_outstanding"], "picker": "session_affinity"})
    insts = instances(*([0] * 8))
    home = {f"s{k}": policy.decide(ClusterView(insts), request(session=f"s{k}")).instance_id for k in range(200)}
    # Same session, same instance, every time (loads all equal here).
    assert all(policy.decide(ClusterView(insts), request(session=s)).instance_id == i for s, i in home.items())
    assert len(set(home.values())) == 8  # sessions spread over the ring
    # Remove one instance: only its sessions move (consistent hashing).
    fewer = [i for i in insts if i.instance_id != "i3"]
    moved = [s for s, i in home.items()
             if policy.decide(ClusterView(fewer), request(session=s)).instance_id != i]
    assert moved and all(home[s] == "i3" for s in moved)


def test_session_affinity_bounded_load_falls_back_to_the_next_on_the_ring() -> None:
    policy = build_policy({"scorers": ["least_outstanding"], "picker": "session_affinity"})
    insts = instances(0, 0, 0, 0)
    home = policy.decide(ClusterView(insts), request(session="alice")).instance_id
    overloaded = [InstanceState(i.instance_id, MODEL, router_inflight=20 if i.instance_id == home else 1)
                  for i in insts]
    decision = policy.decide(ClusterView(overloaded), request(session="alice"))
    assert decision.instance_id != home and decision.instance_ids[-1] == home
    # No session id: plain least-load order.
    assert policy.decide(ClusterView(instances(3, 0, 2, 1)), request()).instance_id == "i1"


def test_prefix_affinity_prefers_the_longest_match_then_load() -> None:
    policy = build_policy({"scorers": ["least_outstanding"], "picker": "prefix_affinity"})
    insts = instances(0, 0, 0, 0)
    # Dispatches recorded by on_dispatch (through DispatchPolicy, as drivers report them).
    policy.on_dispatch(request(prefix=(1, 2, 3)), "i2")
    policy.on_dispatch(request(prefix=(1, 2, 9)), "i1")
    insts[2].router_inflight = 3  # busier, still within the bounded load
    assert policy.decide(ClusterView(insts), request(prefix=(1, 2, 3, 4))).instance_id == "i2"
    assert policy.decide(ClusterView(insts), request(prefix=(1, 2, 9, 9))).instance_id == "i1"
    # i1 and i2 both received (1, 2): equal matches, the less loaded wins.
    assert policy.decide(ClusterView(insts), request(prefix=(1, 2, 7))).instance_id == "i1"
    # No match: least outstanding.
    insts[0].router_inflight = insts[1].router_inflight = 1
    assert policy.decide(ClusterView(insts), request(prefix=(42,))).instance_id == "i3"
    # Over the bounded load: the match is ignored.
    insts[2].router_inflight = 50
    assert policy.decide(ClusterView(insts), request(prefix=(1, 2, 3, 4))).instance_id != "i2"


def test_prefix_affinity_table_is_lru_bounded() -> None:
    policy = build_policy({"picker": {"prefix_affinity": {"capacity_blocks": 2}}})
    insts = instances(0, 0, 0)
    policy.on_dispatch(request(prefix=(1,)), "i2")
    policy.on_dispatch(request(prefix=(2,)), "i1")
    assert policy.decide(ClusterView(insts), request(prefix=(1,))).instance_id == "i2"
    policy.on_dispatch(request(prefix=(3,)), "i1")  # evicts block 1, the least recent
    assert policy.decide(ClusterView(insts), request(prefix=(1,))).instance_id == "i0"
    assert policy.decide(ClusterView(insts), request(prefix=(2,))).instance_id == "i1"


@settings(max_examples=60, deadline=None)
@given(
    loads=st.lists(st.integers(0, 20), min_size=1, max_size=9),
    picker=st.sampled_from(["max_score", "round_robin", "random", "power_of_two", "session_affinity",
                            "prefix_affinity"]),
    session=st.one_of(st.none(), st.text(min_size=1, max_size=5)),
    prefix=st.lists(st.integers(0, 5), max_size=4),
)
def test_every_picker_returns_each_candidate_once(loads: list[int], picker: str, session: str | None,
                                                 prefix: list[int]) -> None:
    policy = build_policy({"scorers": ["least_outstanding"], "picker": picker}, seed=1)
    insts = instances(*loads)
    for n in range(3):
        req = request(n, session, tuple(prefix))
        decision = policy.decide(ClusterView(insts), req)
        assert sorted(decision.instance_ids) == sorted(i.instance_id for i in insts)
        policy.on_dispatch(req, decision.instance_id)


def test_unknown_and_bad_parameters_name_the_allowed_values() -> None:
    with pytest.raises(PolicyConfigError, match="known: .*power_of_two.*session_affinity"):
        build_policy({"picker": "power_of_three"})
    with pytest.raises(PolicyConfigError, match="least_kv"):
        build_policy({"scorers": ["most_kv"]})
    with pytest.raises(PolicyConfigError, match="load_factor"):
        build_policy({"picker": {"session_affinity": {"load_factor": 0.5}}})


def test_queue_policies() -> None:
    interactive = SloClass("interactive", 500, 50, priority=0)
    batch = SloClass("batch", 60000, 1000, priority=2)
    fcfs = build_queue_policy("fcfs")
    assert not fcfs.needs_engine_priority
    assert fcfs.priority(request(), batch, 0.0) == 0
    slo = build_queue_policy({"slo_priority": {"unknown_priority": 5}})
    assert slo.needs_engine_priority
    assert [slo.priority(request(), c, 0.0) for c in (interactive, batch, None)] == [0, 2, 5]
    with pytest.raises(QueuePolicyError, match="known: fcfs, input_length, learned_rank, slo_priority"):
        build_queue_policy("lifo")
    with pytest.raises(QueuePolicyError, match="takes no parameters"):
        build_queue_policy({"fcfs": {"x": 1}})


class _PlainScorer(Scorer):
    """A scorer with only the per-instance method: exercises the default `score_all`."""

    name = "plain_test"

    def score(self, request: RequestInfo, instance: InstanceState, ctx: DispatchContext) -> float:
        return float(instance.running) - 0.5 * instance.waiting


@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6), st.booleans(), st.booleans(),
                  st.sampled_from([MODEL, MODEL.upper(), "other"]), st.integers(0, 1000)),
        min_size=1, max_size=24,
    ),
    filters=st.sampled_from([None, ["model"], ["healthy", "model"], ["model", "healthy", "not_draining", "kv_room"]]),
    scorers=st.sampled_from([["least_outstanding"], ["least_kv"], [],
                             [{"least_outstanding": {"weight": 2.0}}, {"least_kv": {"weight": 0.5}}], "plain"]),
    picker=st.sampled_from(["max_score", "round_robin", "random", "power_of_two", "session_affinity",
                            "prefix_affinity"]),
    shuffle_seed=st.integers(0, 1000),
)
def test_decide_fast_path_equals_the_per_instance_reference(
    rows: list[tuple[int, int, int, bool, bool, str, int]], filters: list[str] | None, scorers: object,
    picker: str, shuffle_seed: int,
) -> None:
    """`decide` (keep_all / score_all / rank) gives the decision, the errors and the RNG
    draws of the one-call-per-instance definition, decision after decision."""
    import random as _random

    states = [
        InstanceState(instance_id=f"i{k:02d}", model=model, running=run, waiting=wait, router_inflight=inflight,
                      healthy=healthy, draining=draining, kv_blocks_total=1000, kv_blocks_used=used)
        for k, (run, wait, inflight, healthy, draining, model, used) in enumerate(rows)
    ]
    _random.Random(shuffle_seed).shuffle(states)
    config: dict[str, object] = {"picker": picker, "seed": 7}
    if filters is not None:
        config["filters"] = filters
    if scorers != "plain":
        config["scorers"] = scorers
    fast, ref = build_policy(config), build_policy(config)
    if scorers == "plain":
        fast.scorers = [(_PlainScorer(), 1.0)]
        ref.scorers = [(_PlainScorer(), 1.0)]
    for n in range(6):
        req = request(n, session=f"s{n % 2}" if n % 3 else None, prefix=(n % 2, 5) if n % 2 else ())
        view = ClusterView(states, now_s=float(n))
        try:
            expected = ref.decide_reference(view, req)
        except NoInstanceAvailable as exc:
            with pytest.raises(NoInstanceAvailable) as got:
                fast.decide(view, req)
            assert str(got.value) == str(exc)
            return
        decision = fast.decide(view, req)
        assert decision == expected
        assert [repr(s) for _, s in decision.scores] == [repr(s) for _, s in expected.scores]  # -0.0 too
        for policy in (fast, ref):
            policy.on_dispatch(req, decision.instance_id)
        next(s for s in states if s.instance_id == decision.instance_id).router_inflight += 1
    assert fast.rng.random() == ref.rng.random()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    filters=st.sampled_from([None, ["model", "healthy"], ["healthy", "kv_room", "not_draining"], ["kv_room"]]),
    picker=st.sampled_from(["max_score", "round_robin", "power_of_two"]),
)
def test_static_filter_cache_follows_the_membership_version(seed: int, filters: list[str] | None,
                                                            picker: str) -> None:
    """With `membership_version`, the leading static filters' result is reused until the
    driver bumps the version (health, draining, model or membership changed); decisions stay
    those of the per-instance reference while load, health and membership change."""
    import random as _random

    rng = _random.Random(seed)
    states = [InstanceState(instance_id=f"i{k}", model=MODEL, kv_blocks_total=100) for k in range(8)]
    view = ClusterView(list(states), membership_version=0)
    config: dict[str, object] = {"picker": picker, "seed": 3}
    if filters is not None:
        config["filters"] = filters
    fast, ref = build_policy(config), build_policy(config)
    for n in range(40):
        change = rng.random()
        inst = rng.choice(view.instances)
        if change < 0.15:
            inst.healthy = not inst.healthy
            view.membership_version += 1  # type: ignore[operator]
        elif change < 0.25:
            inst.draining = not inst.draining
            view.membership_version += 1  # type: ignore[operator]
        elif change < 0.3:
            inst.model = rng.choice([MODEL, "other"])
            view.membership_version += 1  # type: ignore[operator]
        elif change < 0.35:
            view = ClusterView([s for s in states if rng.random() < 0.8] or states[:1], membership_version=0)
        else:
            inst.router_inflight = rng.randint(0, 5)
            inst.kv_blocks_used = rng.randint(0, 100)  # not static: read every time
        req = RequestInfo(request_id=f"r{n}", model=rng.choice([MODEL, MODEL, "other"]),
                          input_tokens=rng.randint(1, 1200))
        try:
            expected = ref.decide_reference(view, req)
        except NoInstanceAvailable as exc:
            with pytest.raises(NoInstanceAvailable) as got:
                fast.decide(view, req)
            assert str(got.value) == str(exc)
            continue
        decision = fast.decide(view, req)
        assert decision == expected
        for policy in (fast, ref):
            policy.on_dispatch(req, decision.instance_id)
