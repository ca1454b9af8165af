"""What a peer can hold on Tokenyard's gRPC ports without making a call, and what a
Worker MigrateIn stream can hold without sending: real servers on loopback.

- Admin + Picker (router/admin_grpc.py), ext_proc (router/extproc.py), the engine's Worker
  service (sim/engine_http.py, sim/worker_grpc.py): a TCP connection that never sends the
  HTTP/2 preface is closed after the handshake timeout, one that sent it and no call
  after the idle timeout, and connections above the cap are closed at once
  (tokenyard/grpc_limits.py, shortened here; grpc's defaults held the first 120 s and the
  others for as long as the peer liked, unauthenticated: auth is per call).
- MigrateIn at a destination: a source that sends Begin (the destination reserves KV
  blocks and takes a migration slot) and then nothing is aborted with TIMEOUT after the
  destination's idle timeout, and its blocks and slot are free again (they were held
  until the TCP connection closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import orjson
import pytest

from router.admin_grpc import start_control_server
from router.app import Router
from router.auth import ControlAuth, Principal, TokenTable, token_digest
from router.config import parse_router_config
from router.extproc import ExtProcSettings, start_extproc_server
from router.registry import InstanceRegistry
from scheduler.types import Decision
from sim.engine_http import EngineServer
from sim.migration_worker import KV_BACKEND_GRPC_INLINE
from tests.test_migration import engine
from tokenyard import grpc_limits
from tokenyard.v1 import worker_pb2, worker_pb2_grpc

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
SHORT = grpc_limits.GrpcServerLimits(handshake_timeout_s=1.0, idle_timeout_s=1.5, max_connections=6)


def closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        while True:
            if sock.recv(65536) == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


async def wait_closed(socks: list[socket.socket], timeout_s: float) -> int:
    """How many of `socks` the server has closed once all are, or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        closed = sum(map(closed_by_peer, socks))
        if closed == len(socks) or time.monotonic() > deadline:
            return closed
        await asyncio.sleep(0.05)


async def admin_port() -> AsyncIterator[int]:
    registry = InstanceRegistry()
    await registry.start()

    async def decide(info: object) -> Decision:
        return Decision(instance_ids=())

    server = await start_control_server(
        "127.0.0.1", 0, registry=registry, store=None, decide=decide,
        auth=ControlAuth.with_tokens(TokenTable([(token_digest("admin-token-0123456789"), Principal("ops"))])))
    try:
        yield server.bound_port
    finally:
        await server.stop(0)
        await registry.close()


async def extproc_port() -> AsyncIterator[int]:
    static = [{"url": "http://10.0.0.1:8000", "model": "llama-3-8b", "id": "e1"}]
    router = Router(parse_router_config({"discovery": {"static": static}}, "extproc.yaml"))
    await router.start(background=False)
    server = await start_extproc_server(router, "127.0.0.1", 0, ExtProcSettings())
    try:
        yield server.port
    finally:
        await server.stop(0)
        await router.stop()


async def worker_port() -> AsyncIterator[int]:
    async with EngineServer(engine("w"), "127.0.0.1", 0, grpc_port=0) as served:
        assert served.grpc_port is not None
        yield served.grpc_port


SERVERS: dict[str, Callable[[], AsyncIterator[int]]] = {"admin": admin_port, "extproc": extproc_port,
                                                        "worker": worker_port}


@pytest.mark.parametrize("surface", sorted(SERVERS))
async def test_a_peer_that_makes_no_call_cannot_hold_a_grpc_port(surface: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_limits, "DEFAULT", SHORT)
    async with contextlib.asynccontextmanager(SERVERS[surface])() as port:
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # never a preface
        idle = []
        for _ in range(2):  # a preface, then no call
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(H2_PREFACE)
            idle.append(sock)
        extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]  # 8 > the cap of 6
        t0 = time.monotonic()
        assert await wait_closed(extra, 1.0) >= 2, "connections above the cap stay open"
        assert await wait_closed(silent, 4.0) == 2, "a peer without a handshake holds its connection"
        assert await wait_closed(idle, 4.0) == 2, "an HTTP/2 connection without a call is held"
        assert time.monotonic() - t0 < 6.0
        for sock in [*silent, *idle, *extra]:
            sock.close()
        # A real client still gets through afterwards.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 5)


def begin(dst: EngineServer, migration_id: str) -> worker_pb2.MigrateInChunk:
    e = dst.engine
    return worker_pb2.MigrateInChunk(begin=worker_pb2.MigrateInBegin(
        migration_id=migration_id, request_id=f"req-{migration_id}", source_instance_id="src",
        destination_instance_id=e.instance_id, model=e.engine_model.model.name, block_size_tokens=e.block_size,
        kv_bytes_per_token=e.kv_wire_bytes_per_token, prompt_tokens=100, tokens_generated=1, max_tokens=4000,
        engine_state=json.dumps({"text_seed": 1, "output_tokens": 10}).encode(),
        kv_transfer_backend=KV_BACKEND_GRPC_INLINE))


async def read(call: object, timeout_s: float) -> worker_pb2.MigrateInResult:
    reader: Callable[[], Awaitable[worker_pb2.MigrateInResult]] = call.read  # type: ignore[attr-defined]
    return await asyncio.wait_for(reader(), timeout_s)


async def test_a_source_that_stops_sending_loses_its_reservation() -> None:
    async with EngineServer(engine("dst"), "127.0.0.1", 0, grpc_port=0) as dst:
        service = dst.engine.migration
        service.idle_timeout_s = 0.5
        async with grpc.aio.insecure_channel(f"127.0.0.1:{dst.grpc_port}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)  # type: ignore[no-untyped-call]
            stalled = []
            for i in range(2):  # no client deadline: only the destination's own bounds apply
                call = stub.MigrateIn()
                await call.write(begin(dst, f"m{i}"))
                answer = await read(call, 3)
                assert answer.state == worker_pb2.RESERVED and answer.blocks_reserved > 0
                stalled.append(call)
            assert service.reserved_blocks() > 0 and service.active() == 2
            t0 = time.monotonic()
            for call in stalled:  # ... and then nothing
                answer = await read(call, 3)
                assert answer.state == worker_pb2.ABORTED and answer.error == worker_pb2.TIMEOUT
                assert "no message from the source within 0.5 s" in answer.error_message
            assert time.monotonic() - t0 < 2.0
            assert service.reserved_blocks() == 0 and service.active() == 0
            assert dst.engine.load().kv_blocks_reserved_for_migration == 0
            # The slots are free for the next source; the lifetime bound holds too.
            service.idle_timeout_s, service.max_lifetime_s = 5.0, 0.6
            call = stub.MigrateIn()
            await call.write(begin(dst, "m-next"))
            assert (await read(call, 3)).state == worker_pb2.RESERVED
            for _ in range(3):  # a drip of messages the destination ignores keeps the idle timer happy
                await asyncio.sleep(0.15)
                await call.write(worker_pb2.MigrateInChunk(blocks=worker_pb2.KVBlocks(stage=1)))
            answer = await read(call, 3)
            assert answer.state == worker_pb2.ABORTED and answer.error == worker_pb2.TIMEOUT
            assert "not committed within 0.6 s" in answer.error_message
            assert service.reserved_blocks() == 0


async def test_a_decided_ext_proc_exchange_held_open_ends_at_the_requests_deadline() -> None:
    """A gateway (or anything on the loopback picker port) that never finishes a decided
    exchange used to hold the chosen instance's in-flight count for ever, steering every
    other request away from it; now the exchange ends at the front door's deadline."""
    from tests.test_extproc_grpc import Stream, chat, headers, picker
    from tests.test_extproc_grpc import body as ext_body

    doc = {"deadlines_ms": {"default": 300}, "slo_classes": {"default": {"ttft_ms": 100, "tpot_ms": 50}}}
    async with picker(**doc) as (router, channel):
        stream = Stream(channel)
        stream.send(headers(authorization="Bearer anything"), ext_body(chat(), True))  # max_tokens 4
        await stream.read(2)  # the decision and the body
        t0 = time.monotonic()
        assert sum(s.router_inflight for s in router.registry.instances()) == 1
        deadline_s = router.config.deadline_s("default", False, 4)
        assert 0.6 < deadline_s < 1.0
        while sum(s.router_inflight for s in router.registry.instances()) and time.monotonic() - t0 < 3:
            await asyncio.sleep(0.05)
        assert sum(s.router_inflight for s in router.registry.instances()) == 0  # ... and never sent a response
        assert time.monotonic() - t0 < deadline_s + 0.5
        assert await stream._next(1) is grpc.aio.EOF  # the picker ended the stream
        assert 'code="504"' in router.metrics.render().decode()


async def test_a_decided_ext_proc_stream_is_bounded_by_the_stall_timeout_once_it_answers() -> None:
    import dataclasses

    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from tests.test_extproc_grpc import MODEL, Stream, headers, picker
    from tests.test_extproc_grpc import body as ext_body

    async with picker(deadlines_ms={"default": 300}) as (router, channel):
        classes = router.config.slo_classes
        classes["default"] = dataclasses.replace(classes["default"], stall_timeout_ms=900)
        stream = Stream(channel)
        raw = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True})
        stream.send(headers(authorization="Bearer anything"), ext_body(raw, True))
        await stream.read(2)
        stream.send(pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=":status", raw_value=b"200")]))))
        await stream.read(1)
        t0 = time.monotonic()
        for _ in range(4):  # chunks within the stall timeout keep it going past the first-byte deadline
            await asyncio.sleep(0.25)
            stream.send(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: {}\n\n", end_of_stream=False)))
            await stream.read(1)
        last_chunk_s = time.monotonic()
        assert last_chunk_s - t0 > 0.9  # past the first-byte deadline (0.3 s) and still going
        assert sum(s.router_inflight for s in router.registry.instances()) == 1
        assert await stream._next(3) is grpc.aio.EOF  # then a stall: ended after 0.9 s of silence
        assert 0.8 < time.monotonic() - last_chunk_s < 2.5
        assert sum(s.router_inflight for s in router.registry.instances()) == 0
