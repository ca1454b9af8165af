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


async def move(src: EngineServer, dst: EngineServer, request_id: str,
               migration_id: str = "m1") -> worker_pb2.MigrationProgress:
    assert src.grpc_address and dst.grpc_address
    async with grpc.aio.insecure_channel(src.grpc_address) as channel:
        call = worker_pb2_grpc.WorkerStub(channel).MigrateOut(worker_pb2.MigrateOutRequest(
            migration_id=migration_id, request_id=request_id, destination_instance_id=dst.engine.instance_id,
            destination_address=dst.grpc_address), timeout=20)
        progress = [p async for p in call]
    return progress[-1]


# ------------------------------------------------------------------ non-streamed requests
def plain_body(chat: bool, max_tokens: int = 120) -> dict[str, Any]:
    if chat:
        return {"model": MODEL, "messages": [{"role": "user", "content": "tell me a story " * 40}],
                "max_tokens": max_tokens, "ignore_eos": True}
    return {"model": MODEL, "prompt": "tell me a story " * 40, "max_tokens": max_tokens, "ignore_eos": True}


def answer_of(doc: dict[str, Any], chat: bool) -> tuple[str, dict[str, int]]:
    choice = doc["choices"][0]
    usage = {k: doc["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return (choice["message"]["content"] if chat else choice["text"]), usage


async def plain_reference(body: dict[str, Any], chat: bool) -> tuple[str, dict[str, int]]:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with EngineServer(engine("ref", time_scale=0.0), "127.0.0.1", 0) as ref, \
            httpx.AsyncClient(base_url=ref.base_url, timeout=20) as client:
        response = await client.post(path, json=body)
    return answer_of(response.json(), chat)


async def _generated(server: EngineServer, request_id: str, tokens: int) -> None:
    """Wait until `request_id` has generated `tokens` tokens on `server`."""
    for _ in range(2000):
        req = server.engine.core.requests.get(request_id)
        if req is not None and req.generated_tokens >= tokens:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{request_id} never reached {tokens} tokens on {server.engine.instance_id}")


@pytest.mark.parametrize("chat", [True, False])
async def test_a_non_streamed_request_migrates_there_and_back_and_answers_once(fleet: list[EngineServer],
                                                                              chat: bool) -> None:
    body = plain_body(chat)
    expected = await plain_reference(body, chat)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with running_router(records(fleet)) as server, httpx.AsyncClient(timeout=30) as client:
        answer = asyncio.ensure_future(client.post(server.url + path, json=body, headers={"x-request-id": "plain"}))
        while not any("plain" in s.engine.core.requests for s in fleet):
            await asyncio.sleep(0.005)
        src, dst = fleet if "plain" in fleet[0].engine.core.requests else fleet[::-1]
        await _generated(src, "plain", 10)
        assert (await move(src, dst, "plain")).state == worker_pb2.COMMITTED
        await _generated(dst, "plain", 40)
        assert (await move(dst, src, "plain", "m2")).state == worker_pb2.COMMITTED  # and back: a marker again
        response = await answer
        assert response.status_code == 200, response.text
        assert answer_of(response.json(), chat) == expected  # every token once, in order; usage whole
        assert server.router.splicer.stats.migrations_spliced == 2
    assert not dst.engine.core.requests and src.engine.requests_in_flight == 0


async def test_a_non_streamed_request_whose_destination_cannot_be_reached_is_continued_elsewhere() -> None:
    # The router knows `src` and `spare`, not `dst`: after the move it cannot attach, so it
    # continues the request on `spare` from the text the source generated.
    servers = [EngineServer(engine(name), "127.0.0.1", 0, grpc_port=0) for name in ("src", "dst", "spare")]
    for srv in servers:
        await srv.start()
    src, dst, spare = servers
    body = plain_body(chat=True)
    expected = await plain_reference(body, chat=True)
    try:
        async with running_router(records([src, spare])) as server, httpx.AsyncClient(timeout=30) as client:
            server.router.registry.set_draining("spare", True)  # the first try goes to src
            answer = asyncio.ensure_future(client.post(server.url + "/v1/chat/completions", json=body,
                                                       headers={"x-request-id": "lost"}))
            await _generated(src, "lost", 10)
            server.router.registry.set_draining("spare", False)
            assert (await move(src, dst, "lost")).state == worker_pb2.COMMITTED
            response = await answer
            assert response.status_code == 200, response.text
            assert answer_of(response.json(), chat=True) == expected
            stats = server.router.splicer.stats
            assert stats.failovers == 1 and stats.migrations_spliced == 0
    finally:
        for srv in servers:
            await srv.stop()
