"""Two router replicas over one real Redis keep session affinity and membership consistent."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from router.state import open_store
from tests.conftest import free_port
from tests.test_router_support import fake_engines, running_router


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A redis-server of this test's own on a free port, nothing persisted."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is required (apt-get install redis-server)"
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        for _ in range(200):
            try:
                if await client.ping():
                    break
            except Exception:
                await asyncio.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0?prefix=ty-{uuid.uuid4().hex[:8]}:"
    finally:
        await client.aclose()
        proc.terminate()
        proc.wait(5)


async def _wait_for(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(300):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_session_affinity_holds_across_replicas_and_moves_together(redis_url: str) -> None:
    chat = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with fake_engines((), (), ()) as engines:
        records = [engine.record(f"e{i}") for i, engine in enumerate(engines)]
        async with running_router(records, store=open_store(redis_url)) as a, \
                running_router([], store=open_store(redis_url), register=False) as b, \
                httpx.AsyncClient() as http:
            await a.router.registry.flush()
            await _wait_for(lambda: len(b.router.registry) == 3, "replica b to learn the three instances")

            async def ask(server, session: str, via_user: bool = False) -> str:  # type: ignore[no-untyped-def]
                if via_user:
                    response = await http.post(server.url + "/v1/chat/completions", json={**chat, "user": session})
                else:
                    response = await http.post(server.url + "/v1/chat/completions", json=chat,
                                               headers={"x-session-id": session})
                assert response.status_code == 200, response.text
                return str(response.headers["x-tokenyard-instance"])

            owners = {}
            for session in ("s1", "s2", "s3"):
                owners[session] = await ask(a, session)
                # Replica b's own view says the owner is the busiest instance: without the
                # shared claim it would pick another one.
                for _ in range(5):
                    b.router.registry.inflight_started(owners[session])
                for server in (b, a, b):
                    assert await ask(server, session) == owners[session]
                for _ in range(5):
                    b.router.registry.inflight_finished(owners[session])
            assert await ask(b, "user-7", via_user=True) == await ask(a, "user-7", via_user=True)

            # Draining the owner on replica a moves the session, and both replicas follow it.
            old = owners["s1"]
            a.router.registry.set_draining(old, True)
            await a.router.registry.flush()
            await _wait_for(lambda: b.router.registry.get(old)[1].draining, "replica b to see the drain")
            new_owner = await ask(b, "s1")
            assert new_owner != old
            assert await ask(a, "s1") == new_owner
            assert await ask(b, "s1") == new_owner
