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
    MigrationCandidate,
    MigrationLoad,
    MigrationPolicyError,
    VirtualUsageBalance,
    build_migration_policy,
)
from scheduler.types import InstanceState
from sim.engine_http import EngineServer
from tests.test_migration import MODEL, engine
from tests.test_migration_router import chat_body, parse, records, reference, sse
from tests.test_router_support import running_router


def load(instance_id: str, used: int, total: int = 1000, **extra: Any) -> MigrationLoad:
    return MigrationLoad(instance_id=instance_id, model=MODEL, kv_blocks_total=total, kv_blocks_used=used,
                         running=extra.pop("running", 10), **extra)


def test_pairs_the_most_loaded_with_the_least_loaded_and_skips_busy_instances() -> None:
    policy = VirtualUsageBalance(overload_usage=0.9, underload_usage=0.6)
    loads = [load("a", 950), load("b", 990), load("c", 100), load("d", 500), load("e", 300, migrating=True),
             load("f", 700, head_of_line_blocks=280)]  # queued demand: f counts as 980
    pairs = policy.pairs(loads)
    assert [(p.source_id, p.destination_id) for p in pairs] == [("b", "c"), ("f", "d")]
    assert policy.pairs([load("a", 990), load("b", 980)]) == []  # nobody to take it


def test_chooses_the_cheapest_move_that_helps_and_never_turns_the_imbalance_around() -> None:
    policy = VirtualUsageBalance(high_priority_below=1)
    source, destination = load("s", 950), load("d", 100)
    cands = [MigrationCandidate("big", 8000, priority=2), MigrationCandidate("small", 320, priority=2),
             MigrationCandidate("vip", 100, priority=0)]
    chosen = policy.choose(source, destination, cands, 16)
    assert chosen is not None and chosen.request_id == "small"  # vip stays; small is cheapest
    # A move that would leave the destination above the source is not made.
    assert policy.choose(load("s", 920), load("d", 590), [MigrationCandidate("x", 16 * 400)], 16) is None
    # When the source's queue is blocked, the cheapest move that unblocks it wins.
    blocked = load("s", 990, head_of_line_blocks=60)
    cands = [MigrationCandidate("tiny", 160, priority=2), MigrationCandidate("enough", 16 * 60, priority=2)]
    chosen = policy.choose(blocked, destination, cands, 16)
    assert chosen is not None and chosen.request_id == "enough"


def test_draining_instances_move_everything_even_high_priority() -> None:
    policy = VirtualUsageBalance(high_priority_below=1)
    draining = load("old", 10, draining=True, running=1)
    pairs = policy.pairs([draining, load("new", 500)])
    assert [(p.source_id, p.destination_id, p.reason) for p in pairs] == [("old", "new", "drain")]
    chosen = policy.choose(draining, load("new", 500), [MigrationCandidate("vip", 100, priority=0)], 16)
    assert chosen is not None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1200), st.integers(0, 300), st.booleans(), st.booleans()),
                min_size=1, max_size=12))
def test_every_instance_is_in_at_most_one_pair(raw: list[tuple[int, int, bool, bool]]) -> None:
    policy = VirtualUsageBalance()
    loads = [load(f"i{k}", used, head_of_line_blocks=head, draining=draining, migrating=busy)
             for k, (used, head, draining, busy) in enumerate(raw)]
    pairs = policy.pairs(loads)
    ids = [p.source_id for p in pairs] + [p.destination_id for p in pairs]
    assert len(ids) == len(set(ids))
    busy = {ld.instance_id for ld in loads if ld.migrating or ld.draining}
    assert not {p.destination_id for p in pairs} & busy
    assert not {p.source_id for p in pairs} & {ld.instance_id for ld in loads if ld.migrating}


def test_bad_config_says_what_and_where() -> None:
    with pytest.raises(MigrationPolicyError, match="unknown 'teleport'"):
        build_migration_policy({"policy": "teleport"})
    with pytest.raises(MigrationPolicyError, match="underload_usage"):
        build_migration_policy({"policy": "llumnix", "overload_usage": 0.5, "underload_usage": 0.7})
    with pytest.raises(MigrationPolicyError, match="migration: .*unexpected keyword"):
        build_migration_policy({"policy": "llumnix", "speed": 3})
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


def test_load_of_estimates_queued_demand_from_what_the_router_sees() -> None:
    state = InstanceState(instance_id="a", model=MODEL, running=4, waiting=2, tokens_in_flight=4000,
                          kv_blocks_used=300, kv_blocks_total=400, block_size_tokens=16)
    assert load_of(state, draining=False, migrating=False).head_of_line_blocks == 63  # 1000 tokens / 16


async def test_the_router_loop_drains_an_instance_by_moving_its_stream() -> None:
    servers = [EngineServer(engine(name), "127.0.0.1", 0, grpc_port=0) for name in ("a", "b")]
    for server in servers:
        await server.start()
    expected, usage = await reference(chat_body())
    try:
        async with running_router(records(servers)) as server, httpx.AsyncClient(timeout=30) as client:
            loop = MigrationLoop(server.router.registry, VirtualUsageBalance(), interval_s=0.05)
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
    config = MigrationSimConfig(policy=build_migration_policy({"policy": "llumnix", "overload_usage": 0.7,
                                                               "underload_usage": 0.5}), link_gbps=50)
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
