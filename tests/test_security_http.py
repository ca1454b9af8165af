"""The control plane's metrics port (router/controlplane_cli.py `serve_metrics`) against
slow and idle clients, on loopback.

prometheus_client's `start_http_server`, which served it before, runs a thread per
connection with no read timeout: 100 connections that each sent half a request head held
100 threads, still there 15 s later. On Tokenyard's HTTP server each gets a 408 after the
head timeout, idle connections close after the idle timeout, connections beyond the cap
get a 503, and a scrape is answered meanwhile.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Gauge

from router.controlplane_cli import serve_metrics
from tests.test_hostile import roundtrip, status
from tokenyard.asgi_server import Http1Limits


async def test_slow_and_idle_clients_cannot_hold_the_control_plane_metrics_port() -> None:
    registry = CollectorRegistry()
    Gauge("tokenyard_controlplane_leader", "1 while leader", registry=registry).set(1)
    limits = Http1Limits(max_body_bytes=0, head_timeout_s=0.3, idle_timeout_s=0.5, max_connections=64)
    server = await serve_metrics("127.0.0.1", 0, registry, limits)
    try:
        assert server.host == "127.0.0.1"
        slow = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(30)]
        for _, writer in slow:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: m\r\n")  # half a head, never finished
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(10)]
        t0 = time.monotonic()
        scrape = await roundtrip(server.port, b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
        assert status(scrape) == 200 and b"tokenyard_controlplane_leader 1.0" in scrape
        replies = await asyncio.gather(*(asyncio.wait_for(reader.read(), 3) for reader, _ in slow))
        assert all(status(reply) == 408 for reply in replies), {status(r) for r in replies}
        assert await asyncio.gather(*(asyncio.wait_for(reader.read(), 3) for reader, _ in idle)) == [b""] * 10
        assert time.monotonic() - t0 < 2.5
        post = await roundtrip(server.port, b"POST /metrics HTTP/1.1\r\nHost: m\r\nContent-Length: 5\r\n\r\nhello")
        assert status(post) == 413  # a scrape has no body
        assert status(await roundtrip(server.port, b"GET /other HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")) == 404
        for _, writer in [*slow, *idle]:
            writer.close()
    finally:
        await server.stop(0.5)


async def test_the_control_plane_metrics_port_caps_its_connections() -> None:
    server = await serve_metrics("127.0.0.1", 0, CollectorRegistry())  # the defaults the command uses
    try:
        assert server.limits.max_connections == 64 and server.limits.head_timeout_s == 10.0
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(64)]
        await asyncio.sleep(0.05)
        reply = await roundtrip(server.port, b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
        assert status(reply) == 503
        for _, writer in held:
            writer.close()
    finally:
        await server.stop(0.5)
