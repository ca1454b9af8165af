"""The router splices a client's stream across a live migration and across an engine death
(router/splice.py): real router, real emulated engines (HTTP + Worker gRPC) on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest

from router.state import InstanceRecord
from sim.engine_http import EngineServer
from tests.test_migration import MODEL, engine
from tests.test_router_support import running_router
from tokenyard.v1 import worker_pb2, worker_pb2_grpc


def chat_body(max_tokens: int = 150) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "tell me a story " * 40}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


async def sse(response: httpx.Response) -> AsyncIterator[str]:
    async for line in response.aiter_lines():
        if line:
            yield line


def parse(lines: list[str]) -> tuple[list[str], dict[str, int] | None, set[str]]:
    """Token texts, the usage block and the chunk ids of a chat stream."""
    texts: list[str] = []
    usage = None
    ids: set[str] = set()
    for line in lines:
        assert line.startswith("data: "), line  # no foreign event reaches the client
        if line == "data: [DONE]":
            continue
        doc = json.loads(line[6:])
        assert "error" not in doc, doc
        ids.add(doc["id"])
        for choice in doc["choices"]:
            content = choice["delta"].get("content")
            if content:
                texts.append(content)
        if doc.get("usage"):
            usage = doc["usage"]
    return texts, usage, ids


@pytest.fixture
async def fleet() -> AsyncIterator[list[EngineServer]]:
    servers = [EngineServer(engine(name), "127.0.0.1", 0, grpc_port=0) for name in ("src", "dst")]
    for server in servers:
        await server.start()
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


def records(servers: list[EngineServer]) -> list[InstanceRecord]:
    return [InstanceRecord(s.engine.instance_id, s.base_url, MODEL, grpc_address=s.grpc_address) for s in servers]


async def reference(body: dict[str, Any]) -> tuple[list[str], dict[str, int] | None]:
    async with EngineServer(engine("ref", time_scale=0.0), "127.0.0.1", 0) as ref, \
            httpx.AsyncClient(base_url=ref.base_url, timeout=20) as client, \
            client.stream("POST", "/v1/chat/completions", json=body) as response:
        texts, usage, _ = parse([line async for line in sse(response)])
    return texts, usage


async def test_the_client_sees_one_stream_across_a_planned_migration(fleet: list[EngineServer]) -> None:
    expected, expected_usage = await reference(chat_body())
    async with running_router(records(fleet)) as server, httpx.AsyncClient(timeout=30) as client:
        lines: list[str] = []
        migration = None
        async with client.stream("POST", server.url + "/v1/chat/completions", json=chat_body(),
                                 headers={"x-request-id": "req-1"}) as response:
            src, dst = fleet if response.headers["x-tokenyard-instance"] == "src" else fleet[::-1]
            async for line in sse(response):
                lines.append(line)
                if len(lines) == 12:
                    migration = asyncio.ensure_future(move(src, dst, "req-1"))
        assert migration is not None
        final = await migration
        assert final.state == worker_pb2.COMMITTED
        texts, usage, ids = parse(lines)
        assert texts == expected and usage == expected_usage
        assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
        assert len(ids) == 1  # one stream: the same chunk id before and after the move
        assert server.router.splicer.stats.migrations_spliced == 1
    assert not src.engine.core.requests and dst.engine.requests_in_flight == 0


async def test_an_engine_dying_mid_stream_is_continued_elsewhere_without_a_gap(fleet: list[EngineServer]) -> None:
    src, dst = fleet
    expected, expected_usage = await reference(chat_body())
    async with running_router(records(fleet)) as server, httpx.AsyncClient(timeout=30) as client:
        lines: list[str] = []
        async with client.stream("POST", server.url + "/v1/chat/completions", json=chat_body()) as response:
            first = src if response.headers["x-tokenyard-instance"] == "src" else dst
            async for line in sse(response):
                lines.append(line)
                if len(lines) == 20:
                    await first.stop(grace_s=0.0)  # the engine goes away mid-stream: its requests are cut
        texts, usage, ids = parse(lines)
        assert texts == expected  # nothing missing, repeated or reordered (greedy-exact here)
        assert usage == expected_usage  # shifted back to the original request's counts
        assert len(ids) == 1 and lines[-1] == "data: [DONE]"
        assert server.router.splicer.stats.failovers == 1


async def move(src: EngineServer, dst: EngineServer, request_id: str) -> worker_pb2.MigrationProgress:
    assert src.grpc_address and dst.grpc_address
    async with grpc.aio.insecure_channel(src.grpc_address) as channel:
        call = worker_pb2_grpc.WorkerStub(channel).MigrateOut(worker_pb2.MigrateOutRequest(
            migration_id="m1", request_id=request_id, destination_instance_id=dst.engine.instance_id,
            destination_address=dst.grpc_address), timeout=20)
        progress = [p async for p in call]
    return progress[-1]
