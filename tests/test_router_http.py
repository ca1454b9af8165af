"""The router's HTTP/1.1 front door (tokenyard/asgi_server.py) at the socket level."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import openai

from router.app import Router
from router.config import parse_router_config
from router.http_server import RouterServer
from tests.test_router_support import FakeEngine, fake_engines

BODY = b'{"model": "llama-3-8b", "prompt": "p", "max_tokens": 2}'


@contextlib.asynccontextmanager
async def served(engine: FakeEngine, **doc: object) -> AsyncIterator[RouterServer]:
    router = Router(parse_router_config(dict(doc), "t.yaml"))
    await router.start(background=False)
    router.registry.upsert(engine.record("e0"))
    server = RouterServer(router, "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if line)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return status, headers, body


def _post(body: bytes = BODY, extra: bytes = b"") -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    with fake_engines(()) as (engine,):
        async with served(engine) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(_post() + b"GET /health HTTP/1.1\r\nHost: r\r\n\r\n" + _post(b"{bad"))
            first, second, third = [await _read_response(reader) for _ in range(3)]
            assert first[0] == 200 and b'"text_completion"' in first[2]
            assert second[0] == 200 and b'"status":"ok"' in second[2]
            assert third[0] == 400 and b"invalid JSON" in third[2]
            writer.close()


async def test_expect_continue_chunked_request_body_and_connection_close() -> None:
    with fake_engines(()) as (engine,):
        async with served(engine) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nExpect: 100-continue\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert interim.startswith(b"HTTP/1.1 100 Continue")
            half = len(BODY) // 2
            writer.write(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, BODY[:half], len(BODY) - half, BODY[half:]))
            status, headers, body = await _read_response(reader)
            assert status == 200 and headers.get("connection") == "close" and b"choices" in body
            assert await asyncio.wait_for(reader.read(), 10) == b""  # the router closed it
            writer.close()


async def test_malformed_request_gets_400_and_oversize_body_413() -> None:
    with fake_engines(()) as (engine,):
        async with served(engine, limits={"max_request_bytes": 100}) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            status, _, body = await _read_response(reader)
            assert status == 400 and b"malformed HTTP request" in body
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            big = b'{"model": "llama-3-8b", "prompt": "' + b"x" * 500 + b'"}'
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big))
            status, _, body = await _read_response(reader)
            assert status == 413 and b"100 bytes" in body
            writer.close()


async def test_client_disconnect_mid_stream_releases_the_engine_slot() -> None:
    engine = FakeEngine("--token-delay-s", "0.05")
    try:
        async with served(engine) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(_post(b'{"model": "llama-3-8b", "prompt": "p", "max_tokens": 200, "stream": true}'))
            await asyncio.wait_for(reader.readuntil(b"data: "), 10)
            state = server.router.registry.get("e0")[1]
            assert state.router_inflight == 1
            writer.close()
            for _ in range(300):
                if state.router_inflight == 0:
                    break
                await asyncio.sleep(0.01)
            assert state.router_inflight == 0
            assert not server.router.pools.get(engine.url).connections()  # engine connection closed: it aborts
    finally:
        engine.kill()


async def test_openai_client_through_the_front_door() -> None:
    with fake_engines(()) as (engine,):
        async with served(engine) as server:
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            reply = await client.completions.create(model="llama-3-8b", prompt="p", max_tokens=3)
            assert reply.choices[0].text == "t0 t1 t2"
            stream = await client.chat.completions.create(
                model="llama-3-8b", messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True)
            assert [c.choices[0].delta.content async for c in stream] == ["t0 ", "t1 ", "t2 "]
