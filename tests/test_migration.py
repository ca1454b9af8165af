"""Live migration between emulated engines: the Worker migration RPCs on real gRPC and
HTTP servers on loopback, the KV bytes copied in stages, and the stream continued on the
destination from the exact token where the source stopped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest

from sim.emulated_engine import EmulatedEngine, EmulatedEngineConfig
from sim.engine_core import EngineConfig
from sim.engine_http import ATTACH_HEADER, EngineServer
from tokenyard.v1 import worker_pb2, worker_pb2_grpc

MODEL = "llama-3-8b"
WIRE_BYTES = 256  # KV bytes per token on the wire (scaled down from 128 KiB)


def engine(name: str, **extra: Any) -> EmulatedEngine:
    engine_kwargs = extra.pop("engine", {})
    return EmulatedEngine(EmulatedEngineConfig(
        model=MODEL, gpu="A100-80GB", instance_id=name, time_scale=extra.pop("time_scale", 0.3),
        kv_wire_bytes_per_token=WIRE_BYTES, engine=EngineConfig(**engine_kwargs), **extra))


@pytest.fixture
async def pair() -> AsyncIterator[tuple[EngineServer, EngineServer]]:
    a = EngineServer(engine("src"), "127.0.0.1", 0, grpc_port=0)
    b = EngineServer(engine("dst"), "127.0.0.1", 0, grpc_port=0)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


def body(prompt_words: int = 300, max_tokens: int = 120) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "word " * prompt_words, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def read_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event name, data) of each SSE event."""
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
        while "\n\n" in buffer:
            raw, buffer = buffer.split("\n\n", 1)
            name = "message"
            data = ""
            for line in raw.splitlines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
            yield name, data


def token_texts(events: list[tuple[str, str]]) -> list[str]:
    out = []
    for name, data in events:
        if name == "message" and data != "[DONE]":
            doc = json.loads(data)
            out.extend(c["text"] for c in doc["choices"])
    return out


def usage_of(events: list[tuple[str, str]]) -> dict[str, int] | None:
    for name, data in events:
        if name == "message" and data != "[DONE]":
            doc = json.loads(data)
            if doc.get("usage"):
                return dict(doc["usage"])
    return None


async def migrate(src: EngineServer, dst: EngineServer, request_id: str,
                  **params: Any) -> list[worker_pb2.MigrationProgress]:
    assert src.grpc_address and dst.grpc_address
    async with grpc.aio.insecure_channel(src.grpc_address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        call = stub.MigrateOut(worker_pb2.MigrateOutRequest(
            migration_id=f"m-{request_id}", request_id=request_id, destination_instance_id="dst",
            destination_address=dst.grpc_address, **params), timeout=20)
        return [p async for p in call]


async def reference_tokens(prompt_words: int, max_tokens: int) -> tuple[list[str], dict[str, int] | None]:
    async with EngineServer(engine("ref", time_scale=0.0), "127.0.0.1", 0) as ref, \
            httpx.AsyncClient(base_url=ref.base_url, timeout=20) as client, \
            client.stream("POST", "/v1/completions", json=body(prompt_words, max_tokens)) as response:
        events = [e async for e in read_events(response)]
    return token_texts(events), usage_of(events)


async def test_a_stream_moves_mid_decode_and_goes_on_from_the_exact_token(
        pair: tuple[EngineServer, EngineServer]) -> None:
    src, dst = pair
    expected, expected_usage = await reference_tokens(300, 120)
    async with httpx.AsyncClient(timeout=20) as client:
        headers = {"x-request-id": "r1"}
        async with client.stream("POST", src.base_url + "/v1/completions", json=body(), headers=headers) as resp:
            events: list[tuple[str, str]] = []
            migration: asyncio.Task[list[worker_pb2.MigrationProgress]] | None = None
            async for event in read_events(resp):
                events.append(event)
                if len(events) == 10:
                    migration = asyncio.ensure_future(migrate(src, dst, "r1"))
        assert migration is not None
        progress = await migration
        assert progress[-1].state == worker_pb2.COMMITTED, progress[-1]
        assert [p.state for p in progress][:2] == [worker_pb2.PRE_COPY, worker_pb2.PRE_COPY]
        name, data = events[-1]
        assert name == "tokenyard.migrated"
        moved = json.loads(data)
        assert moved["destination_instance_id"] == "dst" and moved["tokens"] == progress[-1].tokens_generated
        before = token_texts(events[:-1])
        assert len(before) == moved["tokens"]
        async with client.stream("POST", dst.base_url + "/v1/completions", json=body(),
                                 headers={ATTACH_HEADER.decode(): moved["destination_request_id"]}) as resp:
            after_events = [e async for e in read_events(resp)]
    after = token_texts(after_events)
    assert before + after == expected
    assert usage_of(after_events) == expected_usage
    assert after_events[-1] == ("message", "[DONE]")
    # The source let go of the request and its KV; the destination finished it.
    assert not src.engine.core.requests and src.engine.core.kv_blocks_used == 0
    src.engine.core.check_invariants()
    dst.engine.core.check_invariants()
    # The copy was staged: the stop-and-copy moved a few blocks, not the whole context.
    assert progress[-1].blocks_copied >= (300 // 16)
    assert 0 < progress[-1].suspended_us < 200_000
