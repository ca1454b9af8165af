"""A policy change is live in two router replicas over one real Redis (a redis-server of
this test's own, AOF fsync always), within 1 s, and survives Redis restarting mid-change:
no version lost, no replica left on an old one (pub/sub re-subscribes; the periodic
resync catches a notice sent while a replica was not subscribed)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from router.app import Router
from router.config import parse_router_config
from router.policy_versions import PolicyVersions
from router.state import open_store
from tests.conftest import free_port


class RedisServer:
    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is required (apt-get install redis-server)"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = aioredis.Redis(host="127.0.0.1", port=self.port)
        try:
            for _ in range(250):
                try:
                    if await client.ping():
                        return
                except Exception:
                    await asyncio.sleep(0.02)
            raise AssertionError("redis-server did not start")
        finally:
            await client.aclose()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # no shutdown save: only what the AOF has survives
        self.proc.wait(5)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.proc.terminate()
        server.proc.wait(5)


async def until(cond: Callable[[], bool], what: str, timeout_s: float) -> float:
    """Seconds until `cond` held; AssertionError after `timeout_s`."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_two_replicas_follow_policy_versions_through_a_redis_restart(redis_server: RedisServer) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/0?prefix=ty-{uuid.uuid4().hex[:8]}:"
    config = parse_router_config({"tenants": {"acme": {"api_keys": ["sk-acme"], "slo_class": "interactive"}}},
                                 "r.yaml")
    replicas = [Router(config, store=open_store(url)), Router(config, store=open_store(url))]
    for router in replicas:
        await router.start()
    writer_store = open_store(url)
    versions = PolicyVersions(writer_store)

    def all_at(slo_class: str, priority: int) -> Callable[[], bool]:
        return lambda: all((r.tenants.tenants["acme"].slo_class, r.tenants.tenants["acme"].priority)
                           == (slo_class, priority) for r in replicas)

    try:
        await asyncio.sleep(0.2)  # both replicas subscribed
        await versions.commit("acme", {"slo_class": "batch", "priority": 1}, expected_version=0, author="t",
                              reason="v1")
        took_s = await until(all_at("batch", 1), "both replicas on v1", 1.0)
        assert took_s < 1.0

        # Mid-change: v2 is written, then Redis dies at once (SIGKILL) and comes back.
        await versions.commit("acme", {"slo_class": "default", "priority": 2}, expected_version=1, author="t",
                              reason="v2")
        redis_server.kill()
        await asyncio.sleep(0.3)
        await redis_server.start()
        # Written while the replicas may still be reconnecting: the notice can be missed,
        # the resync (every 5 s) must still bring them to it.
        await _commit_when_up(versions, {"slo_class": "batch", "priority": 3}, 2)
        await until(all_at("batch", 3), "both replicas on v3 after the restart", 8.0)
        history = await versions.history("acme")
        assert [(v.version, v.reason) for v in history] == [(1, "v1"), (2, "v2"), (3, "v3")]

        # And live again within a second once everything is connected.
        await asyncio.sleep(1.5)
        await versions.commit("acme", {"slo_class": "interactive", "priority": 4}, expected_version=3, author="t",
                              reason="v4")
        assert await until(all_at("interactive", 4), "both replicas on v4", 1.0) < 1.0
    finally:
        for router in replicas:
            await router.stop()
        await writer_store.close()


async def _commit_when_up(versions: PolicyVersions, spec: dict[str, object], expected: int) -> None:
    for _ in range(100):
        try:
            await versions.commit("acme", spec, expected_version=expected, author="t", reason="v3")
            return
        except Exception as exc:  # the writer's connection is re-established on the next try
            if "redis" not in type(exc).__module__:
                raise
            await asyncio.sleep(0.05)
    raise AssertionError("Redis did not come back for the writer")
