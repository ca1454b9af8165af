"""One of two router replicas (processes sharing the SQLite file store) killed with
SIGKILL under load: what clients saw, that nothing hung past its deadline, that no
request was answered twice, and that the survivor's state converges with a new replica.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from router.state import open_store
from tests.conftest import REPO_ROOT, free_port
from tests.test_router_support import FakeEngine

DEADLINE_S = 3.0


def start_replica(tmp_path: Path, name: str, engine: FakeEngine) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": port}, "store": f"file://{tmp_path}/state.db",
        "deadlines_ms": {"default": DEADLINE_S * 1000},
        "discovery": {"static": [{"url": engine.url, "model": "llama-3-8b", "id": "e0"}]}}))
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--log-level", "warning", "router", "--config",
                             str(config)], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"replica {name} did not start")


async def test_a_replica_killed_under_load(tmp_path: Path) -> None:
    engine = FakeEngine("--token-delay-s", "0.01")
    a, url_a = start_replica(tmp_path, "a", engine)
    b, url_b = start_replica(tmp_path, "b", engine)
    outcomes: dict[str, int] = {}
    slowest_s = 0.0
    try:
        async with httpx.AsyncClient(timeout=DEADLINE_S + 2) as client:
            async def one(i: int) -> None:
                nonlocal slowest_s
                url = url_a if i % 2 else url_b
                t0 = time.monotonic()
                try:
                    reply = await client.post(url + "/v1/completions", json={
                        "model": "llama-3-8b", "prompt": "p", "max_tokens": 8, "stream": i % 4 == 1})
                    key = f"{'a' if i % 2 else 'b'}:{reply.status_code}"
                    if reply.status_code == 200 and i % 4 == 1 and not reply.text.endswith("data: [DONE]\n\n"):
                        key += ":truncated"
                except httpx.TimeoutException:
                    key = "timeout"
                except httpx.HTTPError:
                    key = f"{'a' if i % 2 else 'b'}:connection-error"
                slowest_s = max(slowest_s, time.monotonic() - t0)
                outcomes[key] = outcomes.get(key, 0) + 1

            tasks = []
            for i in range(240):  # 3 s at 80 requests/s
                tasks.append(asyncio.ensure_future(one(i)))
                if i == 80:
                    os.kill(a.pid, signal.SIGKILL)
                await asyncio.sleep(1 / 80)
            await asyncio.gather(*tasks)
        assert "timeout" not in outcomes and slowest_s < DEADLINE_S + 1, (outcomes, slowest_s)
        assert outcomes.get("b:200", 0) == 120  # the survivor answered every request sent to it
        answered_by_a = outcomes.get("a:200", 0) + outcomes.get("a:200:truncated", 0)
        assert 30 <= answered_by_a <= 50 and outcomes.get("a:connection-error", 0) >= 60
        stats = await engine.stats()
        print(f"replica kill: outcomes {outcomes}, slowest {slowest_s:.2f} s, engine requests {stats['requests_total']}")
        # Each engine request belongs to one client request: none was sent (answered) twice.
        assert stats["requests_total"] <= 120 + answered_by_a + 8, (stats, outcomes)
        # State converges: a drain through the store reaches the survivor and a new replica.
        store = open_store(f"file://{tmp_path}/state.db")
        try:
            assert await store.set_draining("e0", True)
        finally:
            await store.close()
        c, url_c = start_replica(tmp_path, "c", engine)
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                for url in (url_b, url_c):
                    for _ in range(60):
                        health = (await client.get(url + "/health")).json()
                        if health["serving"] == 0:
                            break
                        await asyncio.sleep(0.1)
                    assert health == {"status": "ok", "instances": 1, "serving": 0}, (url, health)
        finally:
            c.terminate()
            c.wait(10)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        engine.kill()
