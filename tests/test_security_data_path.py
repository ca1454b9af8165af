"""Security of the data path: tenants' sessions are theirs, no request field steers the
router to an endpoint it did not discover, and keys and prompts stay out of logs and
metrics.

Real router on loopback with the SQLite file store, scripted engines that record what
they receive; log records are read from the real logging system.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.app import Router
from router.config import parse_router_config
from router.http_server import RouterServer
from router.state import open_store
from tests.test_hostile_support import ScriptedEngine

TENANTS = {"tenants": {"acme": {"api_keys": ["sk-acme-secret-key-1"], "slo_class": "interactive"},
                       "globex": {"api_keys": ["sk-globex-secret-key-2"], "slo_class": "interactive"}},
           "policies": {"default": {"scorers": ["least_outstanding"]}}}
SECRET_PROMPT = "the launch codes are 0000-hunter2"


@contextlib.asynccontextmanager
async def served(tmp_path: Path, engines: list[ScriptedEngine], doc: dict[str, Any]) -> AsyncIterator[RouterServer]:
    router = Router(parse_router_config(doc, "sec.yaml"), store=open_store(f"file://{tmp_path}/state.db"))
    await router.start(background=False)
    for i, engine in enumerate(engines):
        router.registry.upsert(engine.record(f"e{i}"))
    server = RouterServer(router, "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0.5)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_one_tenants_session_id_does_not_reach_another_tenants_instance(tmp_path: Path) -> None:
    """The issue's case: affinity keyed by model and session only let one tenant land on
    the instance holding another tenant's session (shared prefix cache, timing channel)."""
    async with ScriptedEngine() as e0, ScriptedEngine() as e1, served(tmp_path, [e0, e1], TENANTS) as server, \
            httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        registry = server.router.registry
        body = {"model": "llama-3-8b", "prompt": "p", "max_tokens": 2}
        registry.inflight_started("e1")  # acme's session starts on e0 ...
        first = await client.post("/v1/completions", json=body, headers={**auth("sk-acme-secret-key-1"),
                                                                         "x-session-id": "shared-id"})
        assert first.headers["x-tokenyard-instance"] == "e0"
        registry.inflight_finished("e1")
        for _ in range(3):
            registry.inflight_started("e0")  # ... then e0 is the busier one
        reply = await client.post("/v1/completions", json=body, headers={**auth("sk-globex-secret-key-2"),
                                                                         "x-session-id": "shared-id"})
        assert reply.headers["x-tokenyard-instance"] == "e1"  # globex is placed on its own merits
        again = await client.post("/v1/completions", json=body, headers={**auth("sk-acme-secret-key-1"),
                                                                         "x-session-id": "shared-id"})
        assert again.headers["x-tokenyard-instance"] == "e0"  # acme's session still holds
        # A key of neither tenant gets nothing at all.
        denied = await client.post("/v1/completions", json=body, headers=auth("sk-acme-secret-key-1x"))
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"


async def test_no_request_field_makes_the_router_connect_elsewhere(tmp_path: Path) -> None:
    async with ScriptedEngine() as known, ScriptedEngine() as bait, served(tmp_path, [known], {}) as server, \
            httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        steering = {"model": "llama-3-8b", "prompt": "p", "max_tokens": 2, "url": bait.url, "base_url": bait.url,
                    "api_base": bait.url, "endpoint": bait.url, "instance": "bait", "instance_id": "bait"}
        headers = {"Host": f"127.0.0.1:{bait.port}", "X-Forwarded-Host": f"127.0.0.1:{bait.port}",
                   "X-Tokenyard-Instance": "bait", "X-Gateway-Destination-Endpoint": f"127.0.0.1:{bait.port}",
                   "X-Session-Id": f"http://127.0.0.1:{bait.port}"}
        reply = await client.post("/v1/completions", json=steering, headers=headers)
        assert reply.status_code == 200 and reply.headers["x-tokenyard-instance"] == "e0"
        # An absolute-form request target names a host too: the router never follows it.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        body = b'{"model": "llama-3-8b", "prompt": "p", "max_tokens": 2}'
        writer.write(b"POST http://127.0.0.1:%d/v1/completions HTTP/1.1\r\nHost: r\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (bait.port, len(body), body))
        reply_bytes = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert reply_bytes.startswith(b"HTTP/1.1 404")
        assert bait.requests == [] and len(known.requests) == 1


async def test_keys_and_prompts_never_reach_logs_or_metrics(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def fail(reader: Any, writer: Any, request: bytes) -> None:
        writer.write(b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()

    async with ScriptedEngine(fail) as bad, ScriptedEngine() as good, \
            served(tmp_path, [bad, good], TENANTS) as server, \
            httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        server.router.registry.inflight_started("e1")  # the failing engine first: a retry is logged
        body = {"model": "llama-3-8b", "prompt": SECRET_PROMPT, "max_tokens": 2, "stream": False}
        assert (await client.post("/v1/completions", json=body, headers=auth("sk-acme-secret-key-1"))).status_code \
            == 200
        chat = {"model": "llama-3-8b", "messages": [{"role": "user", "content": SECRET_PROMPT}], "stream": True}
        await client.post("/v1/chat/completions", json=chat, headers=auth("sk-globex-secret-key-2"))
        await client.post("/v1/completions", json=body, headers=auth("sk-wrong-key-abcdef"))
        await client.post("/v1/completions", content=b'{"model": "' + SECRET_PROMPT.encode(),
                          headers=auth("sk-acme-secret-key-1"))
        metrics = (await client.get("/metrics")).text
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for secret in ("sk-acme-secret-key-1", "sk-globex-secret-key-2", "sk-wrong-key-abcdef", "hunter2"):
        assert secret not in logged, secret
        assert secret not in metrics, secret
    assert 'tenant="acme"' in metrics  # tenants by name, never by key
