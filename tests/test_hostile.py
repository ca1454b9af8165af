"""Hostile clients against the front door: every case of issue #9, then property-based
fuzzing of each parser the front door, the admin API and the engine client expose.

The HTTP server under test is the real one (tokenyard/asgi_server.py) on loopback, with
short timeouts so that a slowloris case takes a fraction of a second; the router app is
the real one in front of a scripted engine. Target: no 500 from our code, no traceback,
bounded memory per connection, the server still answering afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from router.app import Router
from router.config import parse_router_config
from router.http_server import RouterServer
from tests.test_hostile_support import ScriptedEngine, post
from tokenyard.asgi_server import Http1Limits, Http1Server

FAST = Http1Limits(max_body_bytes=4096, max_url_bytes=256, max_head_bytes=2048, max_headers=20, head_timeout_s=0.3,
                   body_timeout_s=0.3, idle_timeout_s=2.0, write_timeout_s=0.5, max_connections=50)


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers the body's length; /stream streams 64 KiB chunks; /boom raises."""
    message = await receive()
    if scope["path"] == "/boom":
        raise RuntimeError("a bug in the app")
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for _ in range(int(scope["query_string"] or b"3")):
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    body = b'{"len": %d}' % len(message.get("body", b""))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def echo_server(limits: Http1Limits = FAST) -> AsyncIterator[Http1Server]:
    server = Http1Server(echo_app, "127.0.0.1", 0, limits=limits)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0.5)


async def roundtrip(port: int, data: bytes, timeout_s: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        out = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), timeout_s):
                out += chunk
        return out
    finally:
        writer.close()


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0


def error_of(reply: bytes) -> dict[str, Any]:
    return orjson.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]  # type: ignore[no-any-return]


async def health_ms(port: int) -> float:
    t0 = time.perf_counter()
    reply = await roundtrip(port, b"GET /health HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
    assert status(reply) == 200
    return (time.perf_counter() - t0) * 1000


# -- the request head ---------------------------------------------------------------------------
async def test_request_line_header_size_and_count_are_limited() -> None:
    async with echo_server() as server:
        reply = await roundtrip(server.port, b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: r\r\n\r\n")
        assert status(reply) == 414 and error_of(reply)["code"] == 414
        many = b"".join(b"X-%d: v\r\n" % i for i in range(25))
        reply = await roundtrip(server.port, b"GET / HTTP/1.1\r\nHost: r\r\n" + many + b"\r\n")
        assert status(reply) == 431 and "more than 20 request headers" in error_of(reply)["message"]
        reply = await roundtrip(server.port, b"GET / HTTP/1.1\r\nHost: r\r\nX-Big: " + b"v" * 5000 + b"\r\n\r\n")
        assert status(reply) == 431 and "2048 bytes" in error_of(reply)["message"]
        for _ in range(150):  # refused connections are gone within the lingering close (1 s)
            if not server.connections:
                break
            await asyncio.sleep(0.01)
        assert not server.connections


async def test_one_endless_header_value_is_cut_off_and_the_loop_stays_responsive() -> None:
    """The issue's case: one connection streaming a single header value used to starve
    the loop (/health in 4-12 s) and grow RSS by 250 MB."""
    async with echo_server() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: r\r\nX-Flood: ")

        async def flood() -> None:
            with contextlib.suppress(OSError, TimeoutError):
                for _ in range(200):  # up to 12.8 MB, as fast as the socket takes it
                    writer.write(b"a" * 65536)
                    await asyncio.wait_for(writer.drain(), 1)

        flooding = asyncio.ensure_future(flood())
        latencies = []
        for _ in range(5):  # the loop keeps serving others meanwhile
            latencies.append(await health_ms(server.port))
            await asyncio.sleep(0.05)
        reply = b""
        with contextlib.suppress(OSError, TimeoutError):
            reply = await asyncio.wait_for(reader.read(4096), 2)
        await flooding
        writer.close()
        assert status(reply) == 431 and "2048 bytes" in error_of(reply)["message"]
        assert max(latencies) < 500, latencies
        for _ in range(200):  # and the connection is gone soon after (lingering close: 1 s)
            if not server.connections:
                break
            await asyncio.sleep(0.01)
        assert not server.connections


async def test_slowloris_heads_and_short_bodies_are_closed_by_timeouts() -> None:
    async with echo_server() as server:
        slow = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(40)]
        for _, writer in slow:
            writer.write(b"GET / HTTP/1.1\r\nHost: r\r\n")
        short = await asyncio.open_connection("127.0.0.1", server.port)
        short[1].write(b"POST / HTTP/1.1\r\nHost: r\r\nContent-Length: 100\r\n\r\n{\"a\":")
        t0 = time.monotonic()
        for _ in range(3):  # keep dripping header lines: each one used to reset nothing
            await asyncio.sleep(0.15)
            for _, writer in slow:
                with contextlib.suppress(ConnectionError):
                    writer.write(b"X-Drip: 1\r\n")
        replies = await asyncio.gather(*(asyncio.wait_for(r.read(), 3) for r, _ in slow))
        assert all(status(reply) == 408 for reply in replies), {status(r) for r in replies}
        body_reply = await asyncio.wait_for(short[0].read(), 3)
        assert status(body_reply) == 408 and "request body not received" in error_of(body_reply)["message"]
        assert time.monotonic() - t0 < 2.5
        assert server.timed_out_requests == 41
        for _, writer in [*slow, short]:
            writer.close()
        assert await health_ms(server.port) < 500


async def test_expect_continue_only_after_the_size_check() -> None:
    async with echo_server() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: r\r\nExpect: 100-continue\r\nContent-Length: 999999\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 3)
        assert status(reply) == 413 and b"100 Continue" not in reply  # refused before the body is sent
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: r\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)).startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"abcd")
        assert b'{"len": 4}' in await asyncio.wait_for(reader.readuntil(b"}"), 3)
        writer.close()
        # A chunked body is cut off as soon as it passes the limit, not read to its end.
        reply = await roundtrip(server.port, b"POST / HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
                                + b"1000\r\n" + b"x" * 4096 + b"\r\n" + b"10\r\n" + b"y" * 16 + b"\r\n")
        assert status(reply) == 413


async def test_http10_clients_get_no_chunked_framing() -> None:
    async with echo_server() as server:
        reply = await roundtrip(server.port, b"GET /stream?2 HTTP/1.0\r\nHost: r\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert status(reply) == 200 and b"transfer-encoding" not in head.lower() and b"connection: close" in head
        assert body == b"x" * 131072  # delimited by the close
        reply = await roundtrip(server.port, b"GET /stream?1 HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
        assert b"transfer-encoding: chunked" in reply.lower()


async def test_connection_cap_and_app_errors_in_openai_shape(caplog: pytest.LogCaptureFixture) -> None:
    async with echo_server(Http1Limits(max_connections=3)) as server:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        await asyncio.sleep(0.05)
        reply = await roundtrip(server.port, b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
        assert status(reply) == 503 and error_of(reply)["type"] == "service_unavailable"
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.05)
        caplog.set_level(logging.ERROR)
        reply = await roundtrip(server.port, b"GET /boom HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
        assert status(reply) == 500 and error_of(reply) == {"message": "internal error", "type": "internal_error",
                                                            "param": None, "code": 500}
        assert b"Traceback" not in reply and b"RuntimeError" not in reply
        assert server.refused_connections == 1


async def test_a_client_that_stops_reading_is_cut_off() -> None:
    async with echo_server() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /stream?2000 HTTP/1.1\r\nHost: r\r\n\r\n")  # 128 MB it never reads
        await asyncio.sleep(1.5)
        assert not server.connections  # aborted after write_timeout_s, its buffers freed
        writer.close()


# -- the router app ------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def router_with(engine: ScriptedEngine, doc: dict[str, Any] | None = None,
                      **state: Any) -> AsyncIterator[RouterServer]:
    router = Router(parse_router_config(doc or {}, "hostile.yaml"))
    await router.start(background=False)
    router.registry.upsert(engine.record())
    if state:
        router.registry.update_load("e0", **state)
    server = RouterServer(router, "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0.5)


async def test_deep_json_is_a_400_in_openai_shape() -> None:
    async with ScriptedEngine() as engine, router_with(engine) as server:
        for depth in (200, 300, 1000, 10_000):
            body = b'{"model": "llama-3-8b", "prompt": "p", "x": ' + b"[" * depth + b"]" * depth + b"}"
            reply = await roundtrip(server.port, post("/v1/completions", body, b"Connection: close\r\n"))
            assert status(reply) == 400, (depth, reply[:300])
            assert error_of(reply)["type"] == "invalid_request_error"
        assert engine.requests == []


async def test_a_prompt_that_never_fits_is_400_context_length() -> None:
    doc = {"policies": {"default": {"filters": ["model", "healthy", "not_draining", "kv_room"],
                                    "scorers": ["least_outstanding"]}}}
    async with ScriptedEngine() as engine, router_with(engine, doc, kv_blocks_total=1000, kv_blocks_used=0,
                                                        block_size_tokens=16) as server:
        prompt = "word " * 100_000  # ~100k tokens against 16k of KV cache
        body = orjson.dumps({"model": "llama-3-8b", "prompt": prompt, "max_tokens": 4})
        reply = await roundtrip(server.port, post("/v1/completions", body, b"Connection: close\r\n"))
        assert status(reply) == 400
        error = error_of(reply)
        assert error["code"] == "context_length_exceeded" and "16000 tokens" in error["message"]
        # A prompt that fits a free instance but not a busy one is still a retryable 503.
        server.router.registry.update_load("e0", kv_blocks_used=999)
        small = orjson.dumps({"model": "llama-3-8b", "prompt": "word " * 100, "max_tokens": 4})
        reply = await roundtrip(server.port, post("/v1/completions", small, b"Connection: close\r\n"))
        assert status(reply) == 503


async def test_model_names_match_case_insensitively_and_forward_as_the_fleet_spells_them() -> None:
    async with ScriptedEngine() as engine, router_with(engine) as server:
        body = b'{"model": "LLaMA-3-8B", "prompt": "p", "max_tokens": 2}'
        reply = await roundtrip(server.port, post("/v1/completions", body, b"Connection: close\r\n"))
        assert status(reply) == 200
        forwarded = orjson.loads(engine.requests[-1].split(b"\r\n\r\n", 1)[1])
        assert forwarded["model"] == "llama-3-8b"
        metrics = server.router.metrics.render().decode()
        assert 'model="llama-3-8b"' in metrics and "LLaMA" not in metrics
        for name in ("nope-1", "nope-2", "NOPE-3"):  # unknown names never become label values
            body = orjson.dumps({"model": name, "prompt": "p"})
            assert status(await roundtrip(server.port, post("/v1/completions", body, b"Connection: close\r\n"))) == 404
        assert "nope" not in server.router.metrics.render().decode().lower()


async def test_the_routers_own_500s_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    async with ScriptedEngine() as engine, router_with(engine) as server:
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("injected bug")

        monkeypatch.setattr(server.router.dispatcher, "request_info", broken)
        body = b'{"model": "llama-3-8b", "prompt": "p"}'
        reply = await roundtrip(server.port, post("/v1/completions", body, b"Connection: close\r\n"))
        assert status(reply) == 500 and b"injected bug" not in reply
        text = server.router.metrics.render().decode()
        assert 'tokenyard_router_requests_total{code="500"' in text or 'code="500"' in text
