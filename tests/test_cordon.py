"""Cordon, end to end: `tokenyard instances cordon|uncordon` against a running control plane
(real gRPC, both store backends: a SQLite file and the Redis at 127.0.0.1:6379 under a
unique prefix), a second replica over the same store that follows within a second and
stops dispatching to the instance, the audit (who, when, why), and a router with two
emulated engines where a stream in flight on the cordoned engine runs to its end while
every new request goes to the other one. Cordon is not drain: the migration policy takes
nothing off a cordoned instance for it (and moves nothing in), and the control plane's
scale-down does not count it as leaving."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cli.admin_errors import EXIT_DENIED, EXIT_NOT_FOUND, EXIT_USAGE
from router.config import parse_router_config
from router.controlplane import parse_config
from router.controlplane_cli import build
from router.discovery import DiscoveryCollector, StaticDiscovery
from router.dispatcher import Dispatcher
from router.registry import InstanceRegistry
from router.state import InstanceRecord, RedisStateStore, StateStore, cordon_note, open_store
from router.tenants import Tenant
from scheduler.migration import BlockedHeadRelief, MigrationLoad, pick_destination
from scheduler.types import RequestInfo
from sim.engine_http import EngineServer
from tests.test_admin_cli import REDIS_URL, Plane, cli
from tests.test_admin_cli import plane as plane  # noqa: F401  (the fixture: a control plane on each backend)
from tests.test_migration import engine
from tests.test_migration_router import MODEL, chat_body, parse, records, sse
from tests.test_router_support import running_router
from tokenyard.v1 import admin_pb2


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _other_replica(control: Plane, tmp_path: Path) -> tuple[StateStore, InstanceRegistry]:
    """A second router replica's store client and registry over the same store."""
    store = control.store
    if isinstance(store, RedisStateStore):
        other = open_store(f"{REDIS_URL}?prefix={store.prefix}")
    else:
        other = open_store(f"file://{tmp_path}/state.db")
    registry = InstanceRegistry(other)
    await registry.start()
    return other, registry


async def _until(check: object, timeout_s: float) -> float:
    started = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - started < timeout_s, f"not within {timeout_s} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_cordon_reaches_the_other_replica_within_a_second_with_its_audit(
        plane: Plane, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plane.registry.upsert(InstanceRecord("e1", "http://127.0.0.1:10", "llama-3-8b", gpu="a100"))
    await plane.registry.flush()
    other_store, other = await _other_replica(plane, tmp_path)
    try:
        await _until(lambda: "e1" in other, 3.0)
        dispatcher = Dispatcher(parse_router_config({}, "r.yaml"), other, None)
        flags = ("--address", plane.address, "--token-file", str(plane.token_file))
        audit = _Records()
        logging.getLogger("router.fleet_admin").addHandler(audit)  # the CLI run in-process resets the root
        code, out, err = await cli(capsys, "instances", "cordon", "e0", "--reason", "INC-7: slow GPU", "-o", "json",
                                   *flags)
        assert code == 0, err
        shown = json.loads(out)
        assert shown["cordoned"] and shown["changed"] and not shown["draining"]
        assert shown["cordon"]["by"] == "ops" and shown["cordon"]["reason"] == "INC-7: slow GPU"
        took_s = await _until(lambda: other.get("e0")[1].cordoned, 1.0)
        assert took_s < 1.0
        assert not other.get("e0")[1].draining  # a cordon is not a drain
        stored = {r.instance_id: r for r in await other_store.list_instances()}["e0"]
        assert stored.cordon is not None and stored.cordon["by"] == "ops"
        assert abs(stored.cordon["at_unix_ms"] / 1000 - time.time()) < 30
        # The other replica's decisions skip it: every request goes to e1.
        policy = dispatcher.policies[dispatcher.policy_name(Tenant("default", "default"))]
        for k in range(5):
            decision = await dispatcher.decide(RequestInfo(f"r{k}", "llama-3-8b", 10), policy)
            assert decision.instance_ids == ("e1",)
        logged = [r for r in audit.records if r.getMessage() == "instance cordoned"]
        assert logged and logged[-1].principal == "ops" and logged[-1].reason == "INC-7: slow GPU"  # type: ignore[attr-defined]
        # Listed as cordoned; cordoning again changes nothing and keeps the first audit.
        code, out, _ = await cli(capsys, "instances", "list", "-o", "json", *flags)
        assert {i["id"]: i["cordoned"] for i in json.loads(out)} == {"e0": True, "e1": False}
        code, out, _ = await cli(capsys, "instances", "cordon", "e0", "--reason", "again", "-o", "json", *flags)
        assert code == 0 and not json.loads(out)["changed"] and json.loads(out)["cordon"]["reason"] == "INC-7: slow GPU"
        # Uncordon: back in rotation on the other replica within a second.
        code, out, err = await cli(capsys, "instances", "uncordon", "e0", "--reason", "GPU replaced", *flags)
        assert code == 0, err
        await _until(lambda: not other.get("e0")[1].cordoned, 1.0)
        picked = {(await dispatcher.decide(RequestInfo(f"u{k}", "llama-3-8b", 10), policy)).instance_id
                  for k in range(4)}
        assert "e0" in picked
        assert any(r.getMessage() == "instance uncordoned" and r.reason == "GPU replaced"  # type: ignore[attr-defined]
                   for r in audit.records)
    finally:
        logging.getLogger("router.fleet_admin").removeHandler(audit)
        await other.close()
        await other_store.close()


async def test_cordon_refusals(plane: Plane, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ("--address", plane.address, "--token-file", str(plane.token_file))
    code, _, err = await cli(capsys, "instances", "cordon", "e0", *flags)
    assert code == EXIT_USAGE and "--reason is required" in err
    code, _, err = await cli(capsys, "instances", "cordon", "ghost", "--reason", "x", *flags)
    assert code == EXIT_NOT_FOUND and "ghost" in err
    viewer = ("--address", plane.address, "--token-file", str(plane.viewer_file))
    code, _, err = await cli(capsys, "instances", "cordon", "e0", "--reason", "x", *viewer)
    assert code == EXIT_DENIED and "operator" in err
    assert not plane.registry.get("e0")[1].cordoned
    # The RPC itself refuses an empty or oversized reason (a client other than the CLI).
    from router.auth import control_channel
    from tokenyard.v1 import admin_pb2_grpc

    token = Path(plane.token_file).read_text().split("token: ")[1].split()[0]
    async with control_channel(plane.address, token) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        for reason, needle in (("  ", "reason: required"), ("x" * 2000, "at most 1024")):
            with pytest.raises(Exception) as info:
                await stub.CordonInstance(admin_pb2.CordonInstanceRequest(instance_id="e0", cordoned=True,
                                                                          reason=reason))
            assert needle in info.value.details()  # type: ignore[attr-defined]
    assert not plane.registry.get("e0")[1].cordoned


async def test_store_backends_keep_cordon_and_drain_apart(tmp_path: Path) -> None:
    for url in (f"file://{tmp_path}/s.db", f"{REDIS_URL}?prefix=tytest:{uuid.uuid4().hex[:10]}:"):
        store = open_store(url)
        try:
            await store.put_instance(InstanceRecord("a", "http://127.0.0.1:1", "m", labels={"zone": "z"}))
            note = cordon_note("ops", "why", 1_764_660_000_123)
            assert await store.set_cordon("a", note)
            assert await store.set_draining("a", True)
            (got,) = await store.list_instances()
            assert got.cordon == note and got.draining and got.labels == {"zone": "z"}
            assert await store.set_draining("a", False)
            assert await store.set_cordon("a", None)
            (got,) = await store.list_instances()
            assert got.cordon is None and not got.cordoned and not got.draining
            assert not await store.set_cordon("ghost", note)
        finally:
            if isinstance(store, RedisStateStore):
                await store.delete_all()
            await store.close()
    with pytest.raises(ValueError, match=r"instance\.cordon: expected \{by"):
        InstanceRecord.from_dict({"instance_id": "a", "url": "u", "model": "m", "cordon": "yes"})


async def test_static_discovery_keeps_an_operators_cordon(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/s.db")
    registry = InstanceRegistry(store)
    await registry.start()
    static = StaticDiscovery([InstanceRecord("s0", "http://127.0.0.1:1", "m")])
    await static.start(registry)
    assert registry.set_cordon("s0", cordon_note("ops", "look at it"))
    await static.start(registry)  # a restart re-reads the config list
    assert registry.get("s0")[1].cordoned and registry.get("s0")[0].cordon["reason"] == "look at it"  # type: ignore[index]
    from prometheus_client import CollectorRegistry, generate_latest

    metrics = CollectorRegistry()
    metrics.register(DiscoveryCollector(registry, [static]))
    assert 'tokenyard_discovery_instances{pool="default",source="static",state="cordoned"} 1.0' in \
        generate_latest(metrics).decode()
    await registry.close()
    await store.close()


def test_cordon_is_not_drain_for_migration_and_scale_down(tmp_path: Path) -> None:
    policy = BlockedHeadRelief(preempt_guard_blocks=0, destination_reserve_blocks=0, grow_room_blocks=0)
    hot = MigrationLoad("hot", "m", 100, 95, running=4, waiting=1, head_of_line_blocks=10)
    idle_cordoned = MigrationLoad("c", "m", 100, 0, cordoned=True)
    idle = MigrationLoad("i", "m", 100, 10)
    # Nothing moves into a cordoned instance, however idle it is.
    assert [(p.source_id, p.destination_id) for p in policy.pairs([hot, idle_cordoned, idle])] == [("hot", "i")]
    assert policy.pairs([hot, idle_cordoned]) == []
    assert pick_destination(hot, [hot, idle_cordoned]) is None
    # A cordoned, idle instance is no source either (a drained one would be: infinite usage).
    assert policy.pairs([MigrationLoad("c", "m", 100, 30, running=2, cordoned=True), idle]) == []
    # ... even when its queue head is blocked: a cordon leaves its own requests where they are.
    blocked = MigrationLoad("c", "m", 100, 95, running=2, waiting=1, head_of_line_blocks=10, cordoned=True)
    assert policy.pairs([blocked, idle]) == []
    assert policy.pairs([MigrationLoad("d", "m", 100, 30, running=2, draining=True), idle])[0].reason == "drain"

    async def scale_view() -> dict[str, int]:
        store = open_store(f"file://{tmp_path}/cp.db")
        await store.put_instance(InstanceRecord("e0", "http://127.0.0.1:1", MODEL, pool="a10g",
                                                cordon=cordon_note("ops", "x")))
        await store.put_instance(InstanceRecord("e1", "http://127.0.0.1:2", MODEL, pool="a10g"))
        config = parse_config({"store": "file:///unused", "actuator": "print", "input_edges": [0, 1000],
                               "output_edges": [0, 1000],
                               "pools": [{"name": "a10g", "gpu": "A10G", "usd_per_hour": 1.0,
                                          "capacity_rps": [[2.0]]}]}, "cp.yaml")
        plane_, _ = await build(config, store)
        await store.close()
        return dict(plane_.actuator.current_replicas())

    # The control plane counts a cordoned instance in its pool (only draining ones leave).
    assert asyncio.run(scale_view()) == {"a10g": 2}


async def test_a_stream_on_a_cordoned_engine_finishes_and_new_requests_go_elsewhere(tmp_path: Path) -> None:
    from router.auth import write_token_file

    servers = [EngineServer(engine(name), "127.0.0.1", 0) for name in ("e-old", "e-new")]
    for srv in servers:
        await srv.start()
    token_file = tmp_path / "tokens.yaml"
    write_token_file(token_file, "oncall", ["operator"])
    # A generous connect timeout: the CLI runs in a thread of this process, and on a loaded
    # machine its imports can hold the event loop (and the engines in it) past 1 s.
    doc = {"control": {"host": "127.0.0.1", "port": 0, "tokens_file": str(token_file)},
           "retries": {"connect_timeout_s": 10.0}}
    try:
        async with running_router(records(servers), doc=doc) as server, httpx.AsyncClient(timeout=30) as client:
            router = server.router
            router.registry.set_cordon("e-new", cordon_note("t", "hold"))  # the first stream lands on e-old
            first = asyncio.ensure_future(_stream(client, server.url, "long", 300))
            while servers[0].engine.core.num_running < 1:
                await asyncio.sleep(0.01)
            address = f"127.0.0.1:{router.control_server.bound_port}"
            assert await asyncio.to_thread(_cli_main, "instances", "uncordon", "e-new", "--reason", "ready",
                                           "--address", address, "--token-file", str(token_file)) == 0
            assert await asyncio.to_thread(_cli_main, "instances", "cordon", "e-old", "--reason", "INC-9",
                                           "--address", address, "--token-file", str(token_file)) == 0
            # At once, so that without the cordon least-outstanding would send some to e-old.
            short = await asyncio.gather(*(_stream(client, server.url, f"new-{k}", 30) for k in range(4)))
            assert all(len(texts) == 30 for texts, _ in short)
            texts, usage = await asyncio.wait_for(first, 25)  # the cordoned engine's stream ran to its end
            assert len(texts) == 300 and usage is not None and usage["completion_tokens"] == 300
            assert _served(servers[0]) == 1, "a new request reached the cordoned engine"
            assert _served(servers[1]) == 4
    finally:
        for srv in servers:
            await srv.stop()


def _served(server: EngineServer) -> int:
    return sum(server.engine.metrics.request_success.values())


def _cli_main(*argv: str) -> int:
    from cli.main import main

    return main(list(argv))


async def _stream(client: httpx.AsyncClient, url: str, request_id: str, max_tokens: int
                  ) -> tuple[list[str], dict[str, int] | None]:
    async with client.stream("POST", url + "/v1/chat/completions", json=chat_body(max_tokens),
                             headers={"x-request-id": request_id}) as response:
        assert response.status_code == 200
        texts, usage, _ = parse([line async for line in sse(response)])
    return texts, usage


def test_a_cluster_file_cordons_instances_in_the_simulator() -> None:
    from sim.cluster import parse_cluster
    from sim.simulator import Simulation
    from tokenyard.config import ConfigError

    pools = [{"name": "a", "gpu": "A100-80GB", "model": "llama-3-8b", "count": 2}]
    sim = Simulation(parse_cluster({"pools": pools, "cordoned": ["a-0"]}, "c.yaml"))
    assert sim.by_id["a-0"].state.cordoned and not sim.by_id["a-1"].state.cordoned
    assert {sim.decide(RequestInfo(f"r{k}", "llama-3-8b", 10), float(k)).instance_ids for k in range(4)} == {("a-1",)}
    for bad, needle in ((["a-5"], "c.yaml: cordoned[0]: no instance 'a-5'"), ("a-0", "c.yaml: cordoned: expected a list")):
        with pytest.raises(ConfigError) as info:
            parse_cluster({"pools": pools, "cordoned": bad}, "c.yaml")
        assert str(info.value).startswith(needle), str(info.value)
