"""The router and the simulator decide alike.

The same policy document, the same instance load views and the same request sequence are
given to the router's `Dispatcher` (with its real file-backed state store for session
affinity) and to a `Simulation`'s decision step; every decision (the tier of a request
naming the tier alias, the whole fallback order), every admission verdict, and the
admission queue's order must be identical, while both drivers see the same dispatches and
finishes. Hypothesis varies the profiles (a length_bucket routing table among the filters,
replaced mid-sequence by a re-solved plan's through both drivers'
`DecisionLayer.set_routing_table`), windows, affinity, saturation criteria (with the
scale-from-zero hold), queue sorts, tier policies and contracts, prompts and scores, and
loads, and cordons instances: the router through its registry's cordon (as Admin
CordonInstance sets it), the simulator through `Simulation.set_cordoned`, one of them
midway through the sequence.

The control loop too: the router's control plane (a router's workload histogram in the
store, `ControlPlane.tick`) and the simulator's loop (arrivals, `AutoscaledDispatch._tick`),
fed the same windows over the same pools, keep or switch every re-solved plan alike
(`keep_or_switch`, `autoscaler.switch_margin` and `switch_dwell_s`, each driver keeping its
own time of the last pool-set change; the pools' `min_replicas` as floors the re-solve
plans with, `PoolSetSwitch.resolve`) and hand out the same routing tables.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from router.admission import RouterAdmission
from router.config import parse_router_config
from router.dispatcher import Dispatcher
from router.metrics import RouterMetrics
from router.registry import InstanceRegistry
from router.state import FileStateStore, InstanceRecord, cordon_note
from router.tenants import Tenant
from router.tiers import build_tier_resolver
from scheduler.planner.routing import RoutingTable
from scheduler.prefill_rate import note_dispatch
from scheduler.types import InstanceState, NoInstanceAvailable, RequestInfo
from sim.cluster import parse_cluster
from sim.simulator import Simulation
from sim.workload import TraceRequest

PICKERS = ["max_score", "round_robin", "random", "power_of_two", "session_affinity", "prefix_affinity"]
SCORERS = ["least_outstanding", "least_kv", "slo_headroom", "least_virtual_usage"]
POOLS = [("a100", "A100-80GB", "llama-3-8b"), ("l4", "L4", "llama-3-8b"), ("small", "L4", "qwen2.5-1.5b")]
TIER_POLICIES = ["always_large", "always_small", "quality_only", "load_aware", "random_offload", "cascade"]
PROMPTS = [None, None, "What is 2+2?", "Write a haiku about autumn.",
           "Prove that there are infinitely many primes, step by step, and explain each step.",
           "Which of the following is NOT a noble gas?\nA. Neon\nB. Argon\nC. Nitrogen\nD. Xenon"]


def _table(weights: list[dict[str, float]]) -> dict[str, Any]:
    """A plan's routing table over POOLS: input rows [0,512) [512,2048) [2048,...)."""
    return {"input_edges": [0, 512, 2048, 8192], "output_edges": [0, 8192], "cells": [],
            "rows": [{"input": i, "pools": w} for i, w in enumerate(weights)]}


TABLES = [  # what a plan and its re-solved successor might route
    _table([{"l4": 1.0}, {"l4": 0.5, "a100": 0.5}, {"a100": 1.0}]),
    _table([{"a100": 0.3, "l4": 0.7}, {"a100": 1.0}, {"small": 1.0}]),
    # A plan on predicted output lengths: the ranker's predicted_rank picks the output cell.
    {**_table([{"l4": 0.6, "a100": 0.4}, {"a100": 1.0}, {"a100": 1.0}]), "output_edges": [0, 256, 8192],
     "output_source": "predicted_rank",
     "cells": [{"input": 0, "output": 0, "pools": {"l4": 1.0}}, {"input": 0, "output": 1, "pools": {"a100": 1.0}},
               {"input": 1, "output": 0, "pools": {"l4": 0.5, "small": 0.5}}]},
]


@st.composite
def profiles(draw: st.DrawFn) -> dict[str, Any]:
    scorers = draw(st.lists(st.sampled_from(SCORERS), unique=True, max_size=3))
    weighted = [{name: {"weight": draw(st.sampled_from([0.1, 0.5, 1.0, 2.0]))}} for name in scorers]
    for part in weighted:  # its own priority headroom, else the migration section's
        if "least_virtual_usage" in part and draw(st.booleans()):
            part["least_virtual_usage"].update(priority_headroom_blocks=draw(st.sampled_from([0, 300, 5000])),
                                               high_priority_below=draw(st.integers(0, 3)))
    filters: list[Any] = ["model", "healthy", "not_draining", "not_cordoned"] + (
        ["kv_room"] if draw(st.booleans()) else [])
    if draw(st.booleans()):
        filters.append({"length_bucket": {"table": TABLES[draw(st.integers(0, len(TABLES) - 1))]}})
    return {"filters": filters, "scorers": weighted, "picker": draw(st.sampled_from(PICKERS))}


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    saturation = {
        "max_queued_per_instance": draw(st.sampled_from([None, 0, 1, 3])),
        "max_outstanding_per_instance": draw(st.sampled_from([None, 1, 2, 4])),
        "max_kv_usage": draw(st.sampled_from([None, 0.5, 0.9])),
        "max_predicted_ttft_ratio": draw(st.sampled_from([None, 0.5, 1.0])),
    }
    return {
        "seed": draw(st.integers(0, 1000)),
        "slo_classes": {
            "interactive": {"ttft_ms": 500, "tpot_ms": 50, "priority": 0},
            "default": {"ttft_ms": 3000, "tpot_ms": 200, "priority": 1},
            "batch": {"ttft_ms": 60000, "tpot_ms": 1000, "priority": 2, "sheddable": True},
        },
        "profiles": {"default": draw(profiles()), "other": draw(profiles())},
        "selection": {"default": "default",
                      "by_slo_class": draw(st.sampled_from([{}, {"interactive": "other"}])),
                      "by_tenant": draw(st.sampled_from([{}, {"t2": "other"}]))},
        "window": {"max_candidates": draw(st.sampled_from([0, 1, 2, 3, 5]))},
        "affinity": {"enabled": draw(st.booleans()), "ttl_s": 600},
        "queue": {"sort": draw(st.sampled_from(["fcfs", "slo_priority"])), "engine_priority": "slo_priority"},
        "admission": {"enabled": True, "max_queue_depth": draw(st.sampled_from([0, 2, 5])), "saturation": saturation,
                      "hold_until_ready": draw(st.booleans())},
        "tiers": draw(tier_sections()),
        # The priority headroom of virtual usage (least_virtual_usage reads it too); no loop.
        "migration": {"enabled": False, "params": {
            "priority_headroom_blocks": draw(st.sampled_from([0, 16, 400, 5000])),
            "high_priority_below": draw(st.integers(0, 3))}},
    }


@st.composite
def tier_sections(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "alias": "auto", "small_model": "qwen2.5-1.5b", "large_model": "llama-3-8b",
        "policy": draw(st.sampled_from(TIER_POLICIES)),
        "pressure": {**draw(st.sampled_from([{"start": 0.6, "full": 1.0}, {"start": 0.0, "full": 0.05},
                                             {"start": 0.2, "full": 0.6}])),
                     # the TPOT predicted from each instance's prefill rate (scheduler/prefill_rate.py)
                     "tpot": draw(st.sampled_from([True, False, {"start": 0.05, "full": 0.3}]))},
        "mean_output_tokens": draw(st.sampled_from([16, 256])),
        "default": draw(st.sampled_from([{"quality_target": 0.9, "quality_floor": 0.3}, {"cost_budget": 0.3}])),
        "classes": draw(st.sampled_from([{}, {"batch": {"cost_budget": 0.1, "quality_floor": 0.2}}])),
        "tenants": draw(st.sampled_from([{}, {"t2": {"quality_target": 0.95, "quality_floor": 0.8}}])),
    }


loads = st.fixed_dictionaries({
    "running": st.integers(0, 6), "waiting": st.integers(0, 4), "kv": st.floats(0, 0.98),
    "healthy": st.sampled_from([True, True, True, False]), "draining": st.sampled_from([False, False, False, True]),
    "cordoned": st.sampled_from([False, False, False, True]),
    # The queued demand in KV blocks, as the simulator and a Worker status stream report it;
    # None as a /metrics scrape leaves it (estimated from `waiting`).
    "queued": st.one_of(st.none(), st.integers(0, 600)),
    # Running requests per priority class, as the simulator's cores and a Worker status
    # stream report them; None as a /metrics scrape leaves them (no headroom counted).
    "by_priority": st.sampled_from([None, (), ((0, 2),), ((0, 1), (2, 3)), ((1, 4),), ((-1, 1), (1, 2))]),
    "prefill_tokens_per_s": st.sampled_from([0.0, 500.0, 20000.0]),  # as of t = 0
})

requests = st.lists(st.fixed_dictionaries({
    "tenant": st.sampled_from(["t1", "t2"]),
    "slo_class": st.sampled_from(["interactive", "default", "batch"]),
    "session": st.sampled_from([None, "s1", "s2", "s3"]),
    "model": st.sampled_from(["llama-3-8b", "llama-3-8b", "llama-3-8b", "qwen2.5-1.5b", "auto", "auto"]),
    "prompt": st.sampled_from(PROMPTS),  # the tier alias: scored from the text, else `score` given
    "score": st.floats(0, 1),
    "tokens": st.integers(1, 4000),
    "prefix": st.sampled_from([(), (1,), (1, 2), (3, 4, 5)]),
    "finish": st.integers(0, 2),  # how many in-flight requests finish before this one arrives
    "replan": st.sampled_from([None, None, None, 0, 1, 2]),  # a re-solved plan's table arrives first
    "rank": st.sampled_from([None, 1.0, 4.0, 7.5]),  # the output-length ranker's predicted_rank
}), min_size=4, max_size=16)


def _cluster(counts: list[int], doc: dict[str, Any]) -> Any:
    pools = [{"name": name, "gpu": gpu, "model": model, "count": count}
             for (name, gpu, model), count in zip(POOLS, counts, strict=True) if count]
    return parse_cluster({"pools": pools, "policy": doc}, "parity.yaml")


def _set_load(state: InstanceState, load: dict[str, Any], kv_total: int) -> None:
    state.running, state.waiting = load["running"], load["waiting"]
    state.kv_blocks_total = kv_total
    state.kv_blocks_used = int(load["kv"] * kv_total)
    state.kv_blocks_queued = load.get("queued")
    state.running_by_priority = load.get("by_priority")
    state.healthy, state.draining = load["healthy"], load["draining"]
    state.prefill_tokens_per_s, state.prefill_rate_at_s = load.get("prefill_tokens_per_s", 0.0), 0.0


def _outcome(sim: Simulation, info: RequestInfo, now_s: float) -> tuple[str, ...] | str:
    try:
        return tuple(sim.decide(info, now_s).instance_ids)
    except NoInstanceAvailable as exc:
        return f"NoInstanceAvailable: {exc}"


async def _run_parity(doc: dict[str, Any], counts: list[int], instance_loads: list[dict[str, Any]],
                      sequence: list[dict[str, Any]], state_dir: Path, cordon_at: int = -1) -> None:
    cluster = _cluster(counts, doc)
    sim = Simulation(cluster, seed=3)
    store = FileStateStore(state_dir / "state.json")
    clock = [0.0]  # the router's clock, stepped with the simulator's (prefill rates decay on it)
    registry = InstanceRegistry(clock=lambda: clock[0])
    config = parse_router_config({"policy": doc}, "parity.yaml")
    dispatcher = Dispatcher(config, registry, store, seed=3)
    tiers = build_tier_resolver(config.tiers, seed=3) if config.tiers else None  # as Router builds it
    admission = RouterAdmission(dispatcher, RouterMetrics(), dispatcher.layer.new_admission_queue())
    for k, inst in enumerate(sim.instances):
        state = inst.state
        registry.upsert(InstanceRecord(state.instance_id, f"http://127.0.0.1:{9000 + k}", state.model,
                                       gpu=state.gpu, pool=state.pool))
        load = instance_loads[k % len(instance_loads)]
        _set_load(state, load, state.kv_blocks_total)
        _set_load(registry.get(state.instance_id)[1], load, state.kv_blocks_total)
        registry.set_draining(state.instance_id, load["draining"])  # in the record too, as the router keeps it
        if load["cordoned"]:
            sim.set_cordoned(state.instance_id, True)
            registry.set_cordon(state.instance_id, cordon_note("parity", "cordoned from the start"))
    rng = random.Random(len(sequence))
    inflight: list[tuple[RequestInfo, str]] = []
    sim_states = {inst.state.instance_id: inst.state for inst in sim.instances}
    try:
        for n, spec in enumerate(sequence):
            clock[0] = float(n)
            if n == cordon_at:  # a cordon (or uncordon) in the middle: both drivers see it next decision
                iid = sim.instances[n % len(sim.instances)].state.instance_id
                flip = not sim.by_id[iid].state.cordoned
                sim.set_cordoned(iid, flip)
                registry.set_cordon(iid, cordon_note("parity", "midway") if flip else None)
                assert registry.get(iid)[1].cordoned == flip
            for _ in range(min(spec["finish"], len(inflight))):
                info, iid = inflight.pop(rng.randrange(len(inflight)))
                sim.layer.profile(info).on_finish(info, iid)
                sim_states[iid].router_inflight -= 1
                dispatcher.policies[dispatcher.policy_name(Tenant(info.tenant, info.slo_class))].on_finish(info, iid)
                registry.inflight_finished(iid)
            if spec.get("replan") is not None:  # the autoscaler's new plan, the drivers' one call
                table = RoutingTable.from_dict(TABLES[spec["replan"]])
                assert sim.layer.set_routing_table(table) == dispatcher.layer.set_routing_table(table)
            info = RequestInfo(f"r{n}", spec["model"], spec["tokens"], tenant=spec["tenant"],
                               slo_class=spec["slo_class"], session_id=spec["session"], prefix_hashes=spec["prefix"],
                               predicted_rank=spec.get("rank"), arrival_s=float(n))
            if spec["model"] == "auto":  # Tier: the same choice (and reason) from both drivers' own call.
                info = _same_tier(sim, tiers, dispatcher, info, spec, float(n))
            # Admission: the same verdict from both drivers' own offer, the same queue order.
            sim_offer = sim.offer(info, float(n))
            _, router_offer = admission.offer(info, float(n))
            assert router_offer.verdict == sim_offer.verdict, (n, router_offer, sim_offer)
            assert (router_offer.evicted is None) == (sim_offer.evicted is None)
            assert [rid.split("#")[0] for rid in admission.queue.peek_order(n)] == \
                sim.admission.peek_order(n)  # type: ignore[union-attr]
            # Dispatch: the same decision, fallbacks included, on the same views.
            tenant = Tenant(info.tenant, info.slo_class)
            router_policy = dispatcher.policies[dispatcher.policy_name(tenant)]
            sim_policy = sim.layer.profile(info)
            assert router_policy.name == sim_policy.name
            sim_decision = _outcome(sim, info, float(n))
            try:
                router_decision: tuple[str, ...] | str = tuple(
                    (await dispatcher.decide(info, router_policy)).instance_ids)
            except NoInstanceAvailable as exc:
                router_decision = f"NoInstanceAvailable: {exc}"
            assert router_decision == sim_decision, (n, spec, router_decision, sim_decision)
            if isinstance(sim_decision, tuple):
                chosen = sim_decision[0]
                sim_policy.on_dispatch(info, chosen)
                note_dispatch(sim_states[chosen], info.input_tokens, float(n))  # as Simulation._dispatch does
                router_policy.on_dispatch(info, chosen)
                registry.inflight_started(chosen, info.input_tokens)  # as the router's forwarding attempt does
                router_state = registry.get(chosen)[1]
                assert (router_state.prefill_tokens_per_s, router_state.router_inflight) == \
                    (sim_states[chosen].prefill_tokens_per_s, sim_states[chosen].router_inflight)
                inflight.append((info, chosen))
        # Release order: both drivers' saturation checks, the same sort.
        groups = sim.groups
        sim_order = []
        while (item := sim.admission.release(  # type: ignore[union-attr]
                len(sequence), lambda it: not sim.layer.saturated(groups.get(it.request.model.lower(), ()),
                                                                  it.request))) is not None:
            sim_order.append(item.request.request_id)
        router_order = []
        while (item := admission.queue.release(len(sequence), lambda it: not admission._saturated(it.request))) \
                is not None:
            router_order.append(item.request.request_id.split("#")[0])
        assert router_order == sim_order
    finally:
        await store.close()


def _same_tier(sim: Simulation, tiers: Any, dispatcher: Dispatcher, info: RequestInfo, spec: dict[str, Any],
               now_s: float) -> RequestInfo:
    text = spec["prompt"]
    score = None if text else spec["score"]
    info = dataclasses.replace(info, p_small_ok=score)
    trace = TraceRequest(info.request_id, now_s, info.input_tokens, 1, prefix_hashes=info.prefix_hashes,
                         tenant=info.tenant, slo_class=info.slo_class, model="auto", session_id=info.session_id,
                         prompt=text, p_small_ok=score)
    sim_choice = sim.decide_tier(info, trace, sim.cluster.slo_classes.get(info.slo_class, sim.default_slo), now_s)
    router_choice = tiers.decide_info(info, text, dispatcher.slo_class(Tenant(info.tenant, info.slo_class)),
                                      dispatcher)
    assert router_choice == sim_choice, (spec, router_choice, sim_choice)
    return dataclasses.replace(info, model=sim_choice.model)


@settings(max_examples=300, deadline=None)
@given(doc=documents(), counts=st.tuples(st.integers(1, 4), st.integers(0, 4), st.integers(0, 2)).map(list),
       instance_loads=st.lists(loads, min_size=1, max_size=6), sequence=requests, cordon_at=st.integers(-1, 8))
def test_router_and_simulator_decide_alike(doc: dict[str, Any], counts: list[int],
                                           instance_loads: list[dict[str, Any]],
                                           sequence: list[dict[str, Any]], cordon_at: int) -> None:
    with tempfile.TemporaryDirectory() as state_dir:
        asyncio.run(_run_parity(doc, counts, instance_loads, sequence, Path(state_dir), cordon_at))


def test_a_cordoned_instance_gets_nothing_new_in_both_drivers() -> None:
    """A fixed case the random one also covers: the cordoned idle instance is skipped by
    both drivers, by the `not_cordoned` filter of the default profile."""
    doc = {"profiles": {"default": {"scorers": ["least_outstanding"]}}, "window": {"max_candidates": 0},
           "admission": {"enabled": True}}
    loads = [{"running": 0, "waiting": 0, "kv": 0.0, "healthy": True, "draining": False, "cordoned": True},
             {"running": 5, "waiting": 2, "kv": 0.5, "healthy": True, "draining": False, "cordoned": False}]
    sequence = [{"tenant": "t1", "slo_class": "default", "session": None, "model": "llama-3-8b", "tokens": 10,
                 "prefix": (), "finish": 0} for _ in range(4)]
    with tempfile.TemporaryDirectory() as state_dir:
        asyncio.run(_run_parity(doc, [2, 0, 0], loads, sequence, Path(state_dir)))
    sim = Simulation(_cluster([2, 0, 0], {**doc, "seed": 0}), seed=3)
    sim.set_cordoned("a100-0", True)
    assert all(sim.decide(RequestInfo(f"r{k}", "llama-3-8b", 10), float(k)).instance_ids == ("a100-1",)
               for k in range(3))
    sim.set_cordoned("a100-0", False)
    assert sim.decide(RequestInfo("r9", "llama-3-8b", 10), 9.0).instance_id == "a100-0"  # the idle one again


def test_session_affinity_is_keyed_per_tenant() -> None:
    """A tenant sending another tenant's session id does not land on its instance."""
    doc = {"profiles": {"default": {"scorers": ["least_outstanding"]}}, "window": {"max_candidates": 0}}
    cluster = _cluster([2, 0, 0], doc)
    sim = Simulation(cluster)
    a = RequestInfo("a", "llama-3-8b", 10, tenant="alice", session_id="shared")
    first = sim.decide(a, 0.0).instance_id
    sim.by_id[first].state.router_inflight += 5  # alice's instance is now the busier one
    other = sim.decide(RequestInfo("b", "llama-3-8b", 10, tenant="bob", session_id="shared"), 1.0).instance_id
    again = sim.decide(RequestInfo("a2", "llama-3-8b", 10, tenant="alice", session_id="shared"), 2.0).instance_id
    assert other != first and again == first


def test_router_release_draws_nothing_from_the_policies() -> None:
    """Releasing held requests reserves capacity without running a policy part, so the
    released request's one decision draws from the RNG as the simulator's does."""
    asyncio.run(_release_draws_nothing())


async def _release_draws_nothing() -> None:
    doc = {"profiles": {"default": {"scorers": [], "picker": "random"}}, "window": {"max_candidates": 2},
           "admission": {"enabled": True, "saturation": {"max_queued_per_instance": None,
                                                         "max_outstanding_per_instance": 1}}}
    registry = InstanceRegistry()
    dispatcher = Dispatcher(parse_router_config({"policy": doc}, "parity.yaml"), registry, None, seed=3)
    admission = RouterAdmission(dispatcher, RouterMetrics(), dispatcher.layer.new_admission_queue())
    for k in range(4):
        registry.upsert(InstanceRecord(f"i{k}", f"http://127.0.0.1:{9000 + k}", "llama-3-8b"))
        registry.inflight_started(f"i{k}")  # every instance saturated
    waiters = {}
    for n in range(3):
        held, offer = admission.offer(RequestInfo(f"r{n}", "llama-3-8b", 10), float(n))
        assert offer.verdict.value == "queue"
        waiters[held.request_id] = admission._waiters[held.request_id] = asyncio.get_running_loop().create_future()
    registry.inflight_finished("i2")  # one slot frees
    before = [p.rng.getstate() for p in dispatcher.policies.values()]
    admission.release()
    assert [p.rng.getstate() for p in dispatcher.policies.values()] == before
    released = [(rid, f.result()) for rid, f in waiters.items() if f.done()]
    assert [(rid.split("#")[0], verdict.value, reserved) for rid, (verdict, reserved) in released] == \
        [("r0", "admit", "i2")]  # exactly one, into the free slot, reserved there
    assert len(admission.queue) == 2 and registry.get("i2")[1].router_inflight == 1


# ------------------------------------------------------------------------------ migration
migration_params = st.fixed_dictionaries({
    "preempt_guard_blocks": st.integers(0, 40), "destination_reserve_blocks": st.integers(0, 80),
    "min_usage_gap": st.sampled_from([0.0, 0.02, 0.2]), "grow_room_blocks": st.integers(0, 8),
    "high_priority_below": st.integers(0, 2), "priority_headroom_blocks": st.sampled_from([0, 8, 64]),
    "max_context_tokens": st.sampled_from([0, 2048, 32768]),
    "guard_blocks_per_decode": st.sampled_from([0.0, 0.5, 1.0, 2.5]),
})
migration_loads = st.lists(st.tuples(
    st.integers(0, 1000), st.integers(0, 400), st.integers(0, 3), st.integers(0, 64),
    st.sampled_from([False, False, False, True]), st.sampled_from([False, False, True]),
    st.sampled_from([False, False, False, True]), st.sampled_from(["llama-3-8b", "llama-3-8b", "qwen2.5-1.5b"]),
    st.lists(st.tuples(st.integers(1, 6000), st.integers(0, 3)), max_size=5),
    st.sampled_from([None, (), ((0, 1),), ((0, 2), (2, 1)), ((1, 3),)])), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(params=migration_params, raw=migration_loads)
def test_router_and_simulator_order_the_same_migrations(params: dict[str, Any], raw: list[Any]) -> None:
    """One `migration:` section gives the router's loop and the simulator's driver the same
    policy, and the same loads and candidates give the same orders through the steps each
    driver runs: the router `sources` then (its candidates listed over gRPC) `assign`, the
    simulator `plan`."""
    from router.app import Router
    from scheduler.migration import MigrationCandidate, MigrationLoad

    section = {"enabled": True, "interval_s": 0.1, "params": params}
    sim = Simulation(_cluster([1, 0, 0], {"migration": section}))
    router = Router(parse_router_config({"policy": {"migration": section}}, "parity.yaml"))
    assert sim.migration is not None and router.migration is not None
    assert router.migration.interval_s == sim.migration.config.interval_s
    router_policy, sim_policy = router.migration.policy, sim.migration.policy
    # Each driver counts the high-priority running requests with its own policy's headroom
    # (the router from a Worker snapshot's counts, the simulator from its core's).
    assert router_policy.headroom == sim_policy.headroom

    def loads_for(policy: Any) -> list[MigrationLoad]:
        return [MigrationLoad(f"i{k}", model, 1000, used, head_of_line_blocks=head, waiting=waiting, running=running,
                              high_priority_running=policy.headroom.high_priority_running(counts),
                              draining=draining, migrating=migrating, cordoned=cordoned)
                for k, (used, head, waiting, running, draining, migrating, cordoned, model, _, counts)
                in enumerate(raw)]

    candidates = {f"i{k}": [MigrationCandidate(f"i{k}-{j}", tokens, priority) for j, (tokens, priority)
                            in enumerate(cands)] for k, (*_, cands, _) in enumerate(raw)}
    router_loads, sim_loads = loads_for(router_policy), loads_for(sim_policy)
    listed = {iid: candidates[iid] for iid in router_policy.sources(router_loads)}
    router_orders = router_policy.assign(router_loads, listed, 16)
    sim_orders = sim_policy.plan(sim_loads, lambda iid: candidates[iid], 16)
    assert router_orders == sim_orders, (params, router_loads)


# ------------------------------------------------------------------------------ control loop
# The router's control plane (router/controlplane.py: a store histogram -> tick -> _resolve)
# and the simulator's loop (sim/plan_autoscale.py: arrivals -> _tick -> _resolve) fed the
# same windows keep or switch the re-solved plan alike (scheduler.planner.autoscale.keep_or_switch).
LOOP_EDGES = ([0, 1024, 8192], [0, 256, 8192])  # 4 buckets
LOOP_WINDOW_S = 64.0  # a power of two: both drivers' rates (count / 64, and 64 additions of 1/64) are exact
LOOP_GPUS = {"l4": ("L4", 0.7), "a10g": ("A10G", 1.01), "a100": ("A100-80GB", 3.67)}

loop_specs = st.fixed_dictionaries({
    "margin": st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.5]),
    "dwell_s": st.sampled_from([0.0, 0.0, 100.0, 1000.0]),  # windows are 64 s apart
    "headroom": st.sampled_from([0.0, 0.1, 0.2]),
    # the autoscaler's band: the re-solve plans at the larger of its top and the planner's headroom
    "loop_headroom": st.sampled_from([0.0, 0.2, 0.3]),
    "loop_down_headroom": st.sampled_from([0.3, 0.5]),
    # req/s one instance sustains per bucket (0: it cannot meet the SLO), and its maximum
    "l4": st.tuples(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=4, max_size=4), st.sampled_from([2, 4, 12])),
    "a10g": st.tuples(st.lists(st.sampled_from([0.0, 0.7, 1.5]), min_size=4, max_size=4), st.sampled_from([2, 8])),
    "a100": st.tuples(st.lists(st.sampled_from([3.0, 6.0]), min_size=4, max_size=4), st.sampled_from([1, 4])),
    # each pool's min_replicas: the loop's floor, which both drivers' re-solves plan with
    "floors": st.fixed_dictionaries({name: st.sampled_from([0, 0, 1]) for name in ("l4", "a10g", "a100")}),
})
# arrivals per bucket in each 64 s window; the first one (a new leader's first plan) short requests only
# (long prompts, buckets 2 and 3, are rarer: the near-ties between pools are in the short ones)
_short = st.sampled_from([0, 10, 26, 64, 166, 300])
_long = st.sampled_from([0, 0, 0, 10, 64])
loop_windows = st.tuples(st.sampled_from([10, 26, 64]).map(lambda n: [n, 0, 0, 0]), st.lists(
    st.tuples(_short, _short, _long, _long).map(list), min_size=1, max_size=6),
).map(lambda drawn: [drawn[0], *drawn[1]])


def _loop_drivers(spec: dict[str, Any], first: list[int], state_dir: Path) -> tuple[Any, Any, Any]:
    """A control plane and a simulated loop over the same pools; the simulated one starts
    from the plan the control plane adopts on the first window (a new leader has none)."""
    from router.controlplane import ControlPlane, PrintActuator, parse_config
    from scheduler.catalog import default_catalog
    from scheduler.planner.autoscale import AutoscalerConfig, PoolSetSwitch
    from scheduler.planner.problem import PlanProblem, PoolOption, grid_buckets
    from scheduler.planner.routing import table_from_plan
    from sim.cluster import ClusterSpec, PoolSpec
    from sim.engine_core import EngineConfig
    from sim.plan_autoscale import AutoscaledDispatch

    loop = {"interval_s": LOOP_WINDOW_S, "window_s": LOOP_WINDOW_S, "switch_margin": spec["margin"],
            "switch_dwell_s": spec.get("dwell_s", 0.0), "headroom": spec.get("loop_headroom", spec["headroom"]),
            "scale_down_headroom": spec.get("loop_down_headroom", spec.get("loop_headroom", spec["headroom"]))}
    floors = spec.get("floors", {})
    pools = [{"name": name, "gpu": LOOP_GPUS[name][0], "usd_per_hour": LOOP_GPUS[name][1],
              "capacity_rps": [caps[:2], caps[2:]], "max_replicas": count, "min_replicas": floors.get(name, 0)}
             for name, (caps, count) in ((n, spec[n]) for n in LOOP_GPUS)]
    config = parse_config({"store": "file:///unused", "input_edges": LOOP_EDGES[0], "output_edges": LOOP_EDGES[1],
                           "pools": pools, "headroom": spec["headroom"], "resolve_interval_s": LOOP_WINDOW_S,
                           "actuator": "print", "autoscaler": loop, "metrics": {"port": None}}, "parity.yaml")
    plane = ControlPlane(config, FileStateStore(state_dir / "cp.db"), PrintActuator({}, emit=lambda _: None))
    options = tuple(PoolOption(p.name, p.gpu, p.tp, p.usd_per_hour, p.capacity_rps, max_replicas=p.max_replicas)
                    for p in config.pools)
    rates = [[first[0] / LOOP_WINDOW_S, first[1] / LOOP_WINDOW_S], [first[2] / LOOP_WINDOW_S, first[3] / LOOP_WINDOW_S]]
    problem = PlanProblem(grid_buckets(*LOOP_EDGES, rates), options, headroom_fraction=spec["headroom"])
    plan = PoolSetSwitch(config.autoscaler).resolve(None, problem, 0.0).plan  # the control plane's first plan
    catalog = default_catalog()
    model = catalog.model("llama-3-8b")
    cluster = ClusterSpec(pools=tuple(PoolSpec(p.name, catalog.gpu(p.gpu), model, 1, p.max_replicas, EngineConfig())
                                      for p in config.pools),
                          dispatch={"filters": ["model", "healthy", {"length_bucket": {
                              "table": table_from_plan(plan, *LOOP_EDGES).as_dict()}}],
                              "scorers": ["least_outstanding"], "picker": "max_score"}, default_model=model.name)
    assert isinstance(config.autoscaler, AutoscalerConfig) and config.autoscaler.switch_margin == spec["margin"]
    lengths: dict[str, tuple[int, int]] = {}
    loop_sim = AutoscaledDispatch(cluster.build_dispatch(), cluster, plan, {p.name: p.capacity_rps for p in config.pools},
                                  LOOP_EDGES[0], LOOP_EDGES[1], config.autoscaler, 30.0,
                                  plan.instances(), lengths, problem, LOOP_WINDOW_S)
    return plane, loop_sim, plan


async def _run_control_loop_parity(spec: dict[str, Any], windows: list[list[int]], state_dir: Path) -> list[str]:
    """Both drivers through their own inputs and ticks; returns the decisions after the first window."""
    from router.workload_recorder import STORE_KEY_PREFIX
    from scheduler.planner.histogram import LengthHistogram

    base_s = 1_800_000_000.0  # a multiple of the slot
    slot_s = 8.0
    plane, loop_sim, first_plan = _loop_drivers(spec, windows[0], state_dir)
    now = [base_s]
    plane.clock = lambda: now[0]
    loop_sim.last_solve_s = base_s  # the simulated loop was given the first window's plan
    try:
        for w, counts in enumerate(windows):
            now[0] = t = base_s + w * LOOP_WINDOW_S
            # The control plane: one router's histogram with these counts over the window's whole slots.
            hist = LengthHistogram(tuple(LOOP_EDGES[0]), tuple(LOOP_EDGES[1]), slot_s, 60)
            arrivals: list[tuple[int, int]] = []
            for k, count in enumerate(counts):
                row, col = divmod(k, 2)
                for n in range(count):
                    cell = (int((t - LOOP_WINDOW_S) // slot_s) + n % 8, "default", row, col)
                    hist.counts[cell] = hist.counts.get(cell, 0) + 1
                arrivals.extend((k, n) for n in range(count))
            await plane.store.put_load(STORE_KEY_PREFIX + "r0", {"models": {"llama-3-8b": hist.as_dict()}}, ttl_s=600)
            await plane.tick()
            if w == 0:
                assert plane.plan is not None and plane.plan.instances() == first_plan.instances()
                continue
            # The simulated loop: the same arrivals, spread over [t - window, t), the first at its start.
            for n, (k, _) in enumerate(arrivals):
                row, col = divmod(k, 2)
                request_id = f"w{w}-{n}"
                loop_sim.lengths[request_id] = (LOOP_EDGES[0][row] + 1, LOOP_EDGES[1][col] + 1)
                loop_sim._observe(RequestInfo(request_id, "llama-3-8b", LOOP_EDGES[0][row] + 1),
                                  t - LOOP_WINDOW_S + n * LOOP_WINDOW_S / len(arrivals))
            loop_sim._tick(t)
        live = [(c.reason, c.plan.instances()) for _, c in plane.plan_choices[1:]]
        simulated = [(c.reason, c.plan.instances()) for _, c in loop_sim.plan_choices]
        assert live == simulated, (spec, windows)
        assert plane.plan is not None and plane.plan.instances() == loop_sim.plan.instances()
        routing = [a for _, _, a, _ in plane.actions if a == "routing"]
        assert len(routing) - 1 == len(loop_sim.plan_changes)  # an adopted plan's table went out in both
        return [reason for reason, _ in live]
    finally:
        await plane.store.close()
        plane.close()


@settings(max_examples=60, deadline=None)
@given(spec=loop_specs, windows=loop_windows)
def test_router_and_simulator_keep_or_switch_the_re_solved_plan_alike(spec: dict[str, Any],
                                                                      windows: list[list[int]]) -> None:
    with tempfile.TemporaryDirectory() as state_dir:
        asyncio.run(_run_control_loop_parity(spec, windows, Path(state_dir)))


def test_control_loop_parity_sees_every_decision() -> None:
    """A fixed sequence through both drivers: short requests at a near-tie between L4s and an
    A100 (kept at margin 0.2), the same pools on their current shares (steady: a re-balance
    would save nothing), then long prompts the L4 plan cannot serve (switched at once); at
    margin 0 the near-tie switches."""
    spec = {"margin": 0.2, "headroom": 0.1, "l4": ([0.5, 0.5, 0.0, 0.0], 12), "a10g": ([0.0, 0.0, 0.0, 0.0], 2),
            "a100": ([6.0, 6.0, 3.0, 3.0], 4)}
    windows = [[26, 0, 0, 0], [166, 0, 0, 0], [64, 0, 0, 0], [166, 0, 64, 0]]
    with tempfile.TemporaryDirectory() as state_dir:
        assert asyncio.run(_run_control_loop_parity(spec, windows, Path(state_dir))) == ["kept", "steady",
                                                                                        "uncovered"]
    with tempfile.TemporaryDirectory() as state_dir:
        assert asyncio.run(_run_control_loop_parity({**spec, "margin": 0.0}, windows[:2], Path(state_dir))) == \
            ["cheaper"]
