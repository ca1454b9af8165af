"""The Worker gRPC service's bearer token (tokenyard/worker_auth.py) on real gRPC servers
on loopback: refused without it or with a wrong one, served with it, a migration between
two token-protected engines still completes, and an engine without a token refuses to
serve off loopback."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from cli.main import main as cli_main
from router.config import parse_router_config
from router.worker_client import MigrationClient, WorkerClient
from scheduler.types import InstanceState
from sim.engine_http import ATTACH_HEADER, EngineServer
from tests.test_migration import body, engine, read_events, token_texts
from tokenyard.config import ConfigError
from tokenyard.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.worker_auth import read_worker_token, worker_channel, write_worker_token

TOKEN = "s3cret-worker-token-of-32-chars!"
WRONG = "not-the-token-but-long-enough-xx"


@pytest.fixture
async def pair() -> AsyncIterator[tuple[EngineServer, EngineServer]]:
    a = EngineServer(engine("src"), "127.0.0.1", 0, grpc_port=0, worker_token=TOKEN)
    b = EngineServer(engine("dst"), "127.0.0.1", 0, grpc_port=0, worker_token=TOKEN)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


def migrate_out(request_id: str, dst: EngineServer) -> worker_pb2.MigrateOutRequest:
    assert dst.grpc_address
    return worker_pb2.MigrateOutRequest(migration_id=f"m-{request_id}", request_id=request_id,
                                        destination_instance_id="dst", destination_address=dst.grpc_address)


async def calls_with(token: str | None, src: EngineServer, dst: EngineServer) -> list[grpc.StatusCode]:
    """The status of Describe, Status, MigrateOut, MigrateIn and ListMigrations sent with `token`."""
    assert src.grpc_address
    codes = []
    async with worker_channel(src.grpc_address, token) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)  # type: ignore[no-untyped-call]
        calls = [
            lambda: stub.Describe(worker_pb2.DescribeRequest(), timeout=5),
            lambda: stub.Status(worker_pb2.StatusRequest(interval_ms=50), timeout=5).read(),
            lambda: stub.MigrateOut(migrate_out("nope", dst), timeout=5).read(),
            # A streaming client that sends nothing still gets the refusal at once.
            lambda: stub.MigrateIn(timeout=5).read(),
            lambda: stub.ListMigrations(worker_pb2.ListMigrationsRequest(include_candidates=True), timeout=5),
        ]
        for call in calls:
            try:
                await call()
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
    return codes


async def test_calls_without_the_token_or_with_a_wrong_one_are_unauthenticated(
        pair: tuple[EngineServer, EngineServer], caplog: pytest.LogCaptureFixture) -> None:
    src, dst = pair
    assert await calls_with(None, src, dst) == [grpc.StatusCode.UNAUTHENTICATED] * 5
    assert await calls_with(WRONG, src, dst) == [grpc.StatusCode.UNAUTHENTICATED] * 5
    # With it: Describe, a snapshot and ListMigrations answer; MigrateOut of an unknown
    # request is NOT_FOUND (past the check); an empty MigrateIn is the service's own error.
    codes = await calls_with(TOKEN, src, dst)
    assert codes[0] == codes[1] == codes[4] == grpc.StatusCode.OK
    assert codes[2] == grpc.StatusCode.NOT_FOUND
    assert codes[3] != grpc.StatusCode.UNAUTHENTICATED
    denials = [r for r in caplog.records if r.getMessage() == "worker call denied"]
    # Logged, rate-limited per reason (10 denials, 2 reasons), and never the token.
    assert 1 <= len(denials) <= 2
    assert all(WRONG not in str(r.__dict__) for r in denials)


async def test_router_clients_send_the_token(pair: tuple[EngineServer, EngineServer]) -> None:
    src, _ = pair
    assert src.grpc_address
    state = InstanceState(instance_id="src", model="unknown")
    good = WorkerClient(src.grpc_address, state, interval_ms=50, token=TOKEN)
    bad = WorkerClient(src.grpc_address, InstanceState(instance_id="src", model="unknown"), interval_ms=50)
    good.start()
    bad.start()
    try:
        for _ in range(100):
            if good.snapshots:
                break
            await asyncio.sleep(0.05)
        assert good.snapshots >= 1 and state.model == "llama-3-8b"
        assert bad.snapshots == 0 and not bad.connected
    finally:
        await good.stop()
        await bad.stop()
    client = MigrationClient(token=TOKEN)
    try:
        assert await client.candidates(src.grpc_address) == []
    finally:
        await client.close()
    anonymous = MigrationClient()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await anonymous.candidates(src.grpc_address)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await anonymous.close()


async def test_a_migration_between_token_protected_engines_completes(
        pair: tuple[EngineServer, EngineServer]) -> None:
    src, dst = pair
    client = MigrationClient(timeout_s=20, token=TOKEN)
    async with httpx.AsyncClient(timeout=20) as http:
        async with http.stream("POST", src.base_url + "/v1/completions", json=body(200, 80),
                               headers={"x-request-id": "r1"}) as resp:
            events: list[tuple[str, str]] = []
            migration = None
            async for event in read_events(resp):
                events.append(event)
                if len(events) == 5:
                    assert src.grpc_address
                    migration = asyncio.ensure_future(client.migrate(src.grpc_address, migrate_out("r1", dst)))
        assert migration is not None
        final = await migration
        await client.close()
        # The source dialled the destination's MigrateIn with its own token.
        assert final.state == worker_pb2.COMMITTED, final
        name, data = events[-1]
        assert name == "tokenyard.migrated"
        moved = json.loads(data)
        async with http.stream("POST", dst.base_url + "/v1/completions", json=body(200, 80),
                               headers={ATTACH_HEADER.decode(): moved["destination_request_id"]}) as resp:
            after = token_texts([e async for e in read_events(resp)])
    assert len(token_texts(events[:-1])) + len(after) == 80


async def test_a_source_without_the_token_cannot_migrate_into_a_protected_engine() -> None:
    async with EngineServer(engine("src"), "127.0.0.1", 0, grpc_port=0) as src, \
            EngineServer(engine("dst"), "127.0.0.1", 0, grpc_port=0, worker_token=TOKEN) as dst:
        async with httpx.AsyncClient(timeout=20) as http, \
                http.stream("POST", src.base_url + "/v1/completions", json=body(200, 80),
                            headers={"x-request-id": "r2"}) as resp:
            async for _ in read_events(resp):
                assert src.grpc_address
                final = await MigrationClient(timeout_s=20).migrate(src.grpc_address, migrate_out("r2", dst))
                break
        assert final.state == worker_pb2.ABORTED
        assert not dst.engine.core.requests


async def test_no_token_means_loopback_only() -> None:
    server = EngineServer(engine("open"), "0.0.0.0", 0, grpc_port=0)
    with pytest.raises(ConfigError, match="without a token"):
        await server._start_grpc(0)  # the check comes before anything binds
    assert server.grpc_address is None


def test_the_engine_cli_refuses_a_public_grpc_port_without_a_token(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENYARD_WORKER_TOKEN_FILE", raising=False)
    assert cli_main(["engine", "--host", "0.0.0.0", "--port", "0", "--grpc-port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--worker-token-file" in err and "0.0.0.0" in err
    loose = tmp_path / "loose"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    monkeypatch.setenv("TOKENYARD_WORKER_TOKEN_FILE", str(loose))
    assert cli_main(["engine", "--host", "0.0.0.0", "--port", "0", "--grpc-port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected 0600" in err


def test_token_files_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "worker-token"
    token = write_worker_token(path)
    assert os.stat(path).st_mode & 0o777 == 0o600 and read_worker_token(path) == token
    short = tmp_path / "short"
    short.write_text("abc\n")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 16"):
        read_worker_token(short)
    with pytest.raises(ConfigError, match="cannot read"):
        read_worker_token(tmp_path / "missing")
    config = parse_router_config({"load": {"worker_token_file": str(path)}}, "r.yaml")
    assert config.worker_token == token and token not in repr(config)
    with pytest.raises(ConfigError, match=r"r\.yaml: load\.worker_token_file: .*at least 16"):
        parse_router_config({"load": {"worker_token_file": str(short)}}, "r.yaml")
