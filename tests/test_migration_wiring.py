"""The `migration:` section of the policy document, and both drivers started by it: the
router's MigrationLoop over real emulated engines with worker tokens, and the simulator's
MigrationDriver from a cluster YAML."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from scheduler.migration import BlockedHeadRelief, NoMigration
from scheduler.policy_document import PolicyDocumentError, load_policy_document
from sim.engine_http import EngineServer
from tests.test_migration import engine
from tests.test_migration_router import chat_body, parse, records, sse
from tests.test_router_support import running_router
from tokenyard.worker_auth import write_worker_token

KV_BLOCKS = 40
STREAMS = 3
MAX_TOKENS = 200


def test_migration_section_defaults_off_and_round_trips() -> None:
    doc = load_policy_document({})
    assert not doc.migration.enabled and not doc.migration.active()
    raw = {"migration": {"enabled": True, "interval_s": 0.2, "link_gbps": 25,
                         "params": {"preempt_guard_blocks": 4, "destination_reserve_blocks": 32,
                                    "min_usage_gap": 0.05, "grow_room_blocks": 2,
                                    "guard_blocks_per_decode": 0.5}}}
    doc = load_policy_document(raw)
    assert doc.migration.active()
    policy = doc.migration.build_policy()
    assert isinstance(policy, BlockedHeadRelief)
    assert (policy.preempt_guard_blocks, policy.destination_reserve_blocks, policy.min_usage_gap,
            policy.grow_room_blocks, policy.guard_blocks_per_decode) == (4, 32, 0.05, 2, 0.5)
    assert load_policy_document(doc.to_dict()) == doc
    assert load_policy_document(doc.to_dict(minimal=True)) == doc
    assert doc.to_dict(minimal=True)["migration"]["link_gbps"] == 25
    off = load_policy_document({"migration": {"enabled": True, "policy": "none"}})
    assert not off.migration.active() and isinstance(off.migration.build_policy(), NoMigration)


@pytest.mark.parametrize(("raw", "expected"), [
    ({"policy": "llumnx"}, "policy.migration.policy: unknown 'llumnx'; allowed: llumnix, none"),
    ({"interval_s": 0}, "policy.migration.interval_s: Input should be greater than 0 (got 0)"),
    ({"link_gbps": -1}, "policy.migration.link_gbps: Input should be greater than 0 (got -1)"),
    ({"every": 1}, "policy.migration.every: unknown key; allowed: enabled, policy, interval_s, link_gbps, params"),
    ({"params": {"overload": 1}}, "policy.migration.params.overload: unknown key; allowed: preempt_guard_blocks, "
                                  "destination_reserve_blocks, min_usage_gap"),
    ({"params": {"destination_reserve_blocks": -1}},
     "policy.migration.params.destination_reserve_blocks: Input should be greater than or equal to 0 (got -1)"),
    # A document written for the retired usage-balancing policy says what replaced it.
    ({"params": {"overload_usage": 0.9, "underload_usage": 0.6}},
     "policy.migration.params.overload_usage: retired (sources are now instances whose queue head cannot be "
     "admitted (see preempt_guard_blocks)); set preempt_guard_blocks, destination_reserve_blocks and "
     "min_usage_gap instead (docs/migration.md) (got 0.9)"),
    ({"params": {"underload_usage": 0.6}}, "policy.migration.params.underload_usage: retired (destinations"),
])
def test_migration_errors_name_path_value_and_allowed(raw: dict[str, object], expected: str) -> None:
    with pytest.raises(PolicyDocumentError) as info:
        load_policy_document({"migration": raw})
    assert str(info.value).startswith(expected), str(info.value)


# ------------------------------------------------------------------------------ the router
ROUTER_MIGRATION = {"enabled": True, "interval_s": 0.05,
                    "params": {"preempt_guard_blocks": 2, "destination_reserve_blocks": 2, "grow_room_blocks": 2}}


async def test_a_router_with_migration_enabled_moves_a_request_off_an_overloaded_engine(tmp_path: Path) -> None:
    token_file = tmp_path / "worker-token"
    token = write_worker_token(token_file)
    servers = [EngineServer(engine(name, engine={"num_kv_blocks": KV_BLOCKS}), "127.0.0.1", 0, grpc_port=0,
                            worker_token=token) for name in ("src", "dst")]
    for srv in servers:
        await srv.start()
    src, dst = servers
    doc = {"load": {"scrape_interval_s": 0.05, "worker_token_file": str(token_file)},
           "policy": {"migration": ROUTER_MIGRATION}}
    try:
        async with running_router(records(servers)[:1], doc=doc, background=True) as server, \
                httpx.AsyncClient(timeout=30) as client:
            router = server.router
            assert router.migration is not None and router.migration.client.token == token
            # Every stream lands on `src` (the only member yet); then `dst` joins, idle.
            streams = [asyncio.ensure_future(_collect(client, server.url, f"req-{i}")) for i in range(STREAMS)]
            while src.engine.core.num_running < STREAMS:
                await asyncio.sleep(0.01)
            router.registry.upsert(records(servers)[1])
            results = await asyncio.wait_for(asyncio.gather(*streams), 25)
            stats = router.migration.stats
            assert stats.committed >= 1, stats
            assert router.splicer.stats.migrations_spliced >= 1
            for texts, usage in results:  # every client got its whole answer, once
                assert len(texts) == MAX_TOKENS and usage is not None and usage["completion_tokens"] == MAX_TOKENS
            metrics = (await client.get(server.url + "/metrics")).text
            assert 'tokenyard_router_migrations_total{outcome="committed",reason="load"}' in metrics
            assert router.migration._task is not None
        assert router.migration._task is None  # Router.stop stopped the loop
    finally:
        for srv in servers:
            await srv.stop()


async def _collect(client: httpx.AsyncClient, url: str, request_id: str) -> tuple[list[str], dict[str, int] | None]:
    body = chat_body(MAX_TOKENS)
    async with client.stream("POST", url + "/v1/chat/completions", json=body,
                             headers={"x-request-id": request_id}) as response:
        assert response.status_code == 200
        texts, usage, _ = parse([line async for line in sse(response)])
    return texts, usage


# --------------------------------------------------------------------------- the simulator
CLUSTER_YAML = """\
default_model: llama-3-8b
pools: [{name: l4, gpu: L4, model: llama-3-8b, count: 4, engine: {max_num_seqs: 64}}]
policy:
  profiles:
    default: {filters: [model], scorers: [least_outstanding], picker: round_robin}
  migration: {enabled: %s, interval_s: 0.05, link_gbps: 50,
              params: {preempt_guard_blocks: 8, destination_reserve_blocks: 16}}
"""


def _write_run(tmp_path: Path, enabled: bool) -> tuple[Path, Path]:
    # Long answers land round-robin on the first two instances; short ones finish fast on the others.
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": i * 0.05, "input_tokens": 2000,
                                         "output_tokens": 600 if i % 4 < 2 else 5}) + "\n" for i in range(120)))
    cluster = tmp_path / f"cluster-{enabled}.yaml"
    cluster.write_text(CLUSTER_YAML % ("true" if enabled else "false"))
    return cluster, trace


def test_a_cluster_document_with_migration_drives_the_simulator(tmp_path: Path) -> None:
    from sim.cluster import load_cluster
    from sim.simulator import Simulation

    cluster_path, _ = _write_run(tmp_path, enabled=True)
    sim = Simulation(load_cluster(cluster_path))
    assert sim.migration is not None and not sim.fast_forward
    assert sim.migration.config.link_gbps == 50 and sim.migration.config.interval_s == 0.05
    off_path, _ = _write_run(tmp_path, enabled=False)
    assert Simulation(load_cluster(off_path)).migration is None


def test_tokenyard_sim_run_with_migration_on_reports_migrations(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    cluster, trace = _write_run(tmp_path, enabled=True)
    out = tmp_path / "out"
    assert main(["sim", "run", str(cluster), "--trace", str(trace), "--no-plots", "--no-progress",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    moves = summary["migrations"]
    assert moves["committed"] > 0 and moves["started"] >= moves["committed"] + moves["aborted"], moves
    assert summary["completed"] == 120
    assert "migrations " in capsys.readouterr().out
    off, _ = _write_run(tmp_path, enabled=False)
    assert main(["sim", "run", str(off), "--trace", str(trace), "--no-plots", "--no-progress",
                 "--out", str(tmp_path / "off")]) == 0
    assert "migrations" not in json.loads((tmp_path / "off" / "summary.json").read_text())


def test_one_document_gives_the_router_and_the_simulator_the_same_migration_decisions(tmp_path: Path) -> None:
    from router.app import Router
    from router.config import parse_router_config
    from scheduler.migration import MigrationCandidate, MigrationLoad
    from sim.cluster import load_cluster
    from sim.simulator import Simulation

    cluster_path, _ = _write_run(tmp_path, enabled=True)
    cluster = load_cluster(cluster_path)
    sim = Simulation(cluster)
    # The router's file carries the cluster file's `migration:` section.
    router = Router(parse_router_config({"policy": {"migration": cluster.document().to_dict()["migration"]}},
                                        "router.yaml"))
    assert sim.migration is not None and router.migration is not None
    assert router.migration.interval_s == sim.migration.config.interval_s == 0.05
    # a and c: queue heads blocked (deficits 13 and 13 with the guard of 8); b and d have room.
    loads = [MigrationLoad("a", "m", 100, 80, running=4, waiting=1, head_of_line_blocks=25),
             MigrationLoad("b", "m", 100, 10, running=1),
             MigrationLoad("c", "m", 100, 75, running=3, waiting=2, head_of_line_blocks=30),
             MigrationLoad("d", "m", 100, 40)]
    cands = {"a": [MigrationCandidate("a1", 600), MigrationCandidate("a2", 300)],
             "c": [MigrationCandidate("c1", 200, priority=2), MigrationCandidate("c2", 100)]}
    plans = [p.plan(loads, lambda i: cands.get(i, []), 16) for p in (router.migration.policy, sim.migration.policy)]
    assert plans[0] == plans[1], plans
    assert [(o.request_id, o.source_id, o.destination_id) for o in plans[0]] == [("a2", "a", "b"), ("c1", "c", "d")]
