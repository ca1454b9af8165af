"""Fault handling: killed engines, mid-stream failures, draining, deadlines, breakers, budgets."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import openai
import pytest

from router.config import HealthConfig
from router.health import CLOSED, HALF_OPEN, OPEN, HealthMonitor
from router.metrics import RouterMetrics
from router.registry import InstanceRegistry
from router.state import InstanceRecord
from router.tenants import RetryBudget
from tests.conftest import free_port
from tests.test_router_support import FakeEngine, fake_engines, running_router

CHAT = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


async def test_requests_retry_on_the_next_instance_when_an_engine_is_killed() -> None:
    with fake_engines((), ()) as (alive, doomed):
        # Ties go by instance id, so every request tries "a-doomed" first.
        records = [alive.record("b-alive"), doomed.record("a-doomed")]
        doc = {"health": {"eject_after_failures": 2, "eject_s": 30}}
        async with running_router(records, doc) as server:
            doomed.kill()
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            for _ in range(12):
                reply = await client.chat.completions.with_raw_response.create(**CHAT)
                assert reply.headers["x-tokenyard-instance"] == "b-alive"
                assert reply.parse().choices[0].message.content
            _, doomed_state = server.router.registry.get("a-doomed")
            assert not doomed_state.healthy  # ejected after consecutive connect failures
            assert server.router.health.breaker("a-doomed").state == OPEN
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(server.url + "/metrics")).text
            assert 'tokenyard_router_retries_total{tenant="anonymous"}' in metrics


async def test_all_instances_down_gives_502_in_openai_shape() -> None:
    with fake_engines(()) as (engine,):
        async with running_router([engine.record("only")]) as server:
            engine.kill()
            async with httpx.AsyncClient() as http:
                response = await http.post(server.url + "/v1/chat/completions", json=CHAT)
            assert response.status_code == 502
            error = response.json()["error"]
            assert "only" in error["message"] and error["code"] == "upstream_unavailable"


async def test_engine_killed_mid_stream_gives_an_error_event_then_done() -> None:
    engine = FakeEngine("--token-delay-s", "0.05")
    try:
        async with running_router([engine.record("e0")]) as server, httpx.AsyncClient() as http:
            body = {"model": "llama-3-8b", "prompt": "p", "max_tokens": 200, "stream": True}
            events: list[str] = []
            async with http.stream("POST", server.url + "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if not line:
                        continue
                    events.append(line)
                    if len(events) == 2:
                        engine.kill()
            assert events[0].startswith("data: {") and '"text"' in events[0]
            assert events[-1] == "data: [DONE]"
            error = json.loads(events[-2].removeprefix("data: "))["error"]
            assert "mid-stream" in error["message"] and error["code"] == "upstream_stream_error"
            assert all(e.startswith("data: ") for e in events)  # every event whole, none truncated
    finally:
        engine.kill()


async def test_openai_client_sees_the_mid_stream_failure_as_an_error() -> None:
    engine = FakeEngine("--token-delay-s", "0.05")
    try:
        async with running_router([engine.record("e0")]) as server:
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            stream = await client.completions.create(model="llama-3-8b", prompt="p", max_tokens=200, stream=True)
            received = 0
            with pytest.raises(openai.APIError, match="mid-stream"):
                async for _ in stream:
                    received += 1
                    if received == 2:
                        engine.kill()
            assert received >= 2
    finally:
        engine.kill()


async def test_draining_instance_finishes_running_streams_and_gets_no_new_requests() -> None:
    with fake_engines(("--token-delay-s", "0.02"), ("--token-delay-s", "0.02")) as (a, b):
        async with running_router([a.record("a"), b.record("b")]) as server, httpx.AsyncClient() as http:
            body = {"model": "llama-3-8b", "prompt": "p", "max_tokens": 30, "stream": True}
            async with http.stream("POST", server.url + "/v1/completions", json=body) as running:
                draining = running.headers["x-tokenyard-instance"]
                other = "b" if draining == "a" else "a"
                server.router.registry.set_draining(draining, True)
                for _ in range(6):
                    reply = await http.post(server.url + "/v1/completions",
                                            json={"model": "llama-3-8b", "prompt": "p", "max_tokens": 2})
                    assert reply.status_code == 200
                    assert reply.headers["x-tokenyard-instance"] == other
                lines = [line async for line in running.aiter_lines() if line]
            assert lines[-1] == "data: [DONE]"
            assert sum(1 for line in lines if '"text"' in line) == 30  # the running stream completed


async def _blackhole(port: int) -> asyncio.Server:
    """Accepts connections and never answers: an engine that hangs before the first byte."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read(-1)
        writer.close()

    return await asyncio.start_server(hold, "127.0.0.1", port)


async def test_deadline_exceeded_before_first_byte_is_504() -> None:
    port = free_port()
    hole = await _blackhole(port)
    try:
        record = InstanceRecord("hung", f"http://127.0.0.1:{port}", "llama-3-8b")
        doc = {"deadlines_ms": {"default": 300}}
        async with running_router([record], doc) as server, httpx.AsyncClient() as http:
            response = await http.post(server.url + "/v1/chat/completions", json={**CHAT, "stream": True})
            assert response.status_code == 504
            error = response.json()["error"]
            assert error["code"] == "deadline_exceeded" and "'default'" in error["message"]
            assert server.router.registry.get("hung")[1].router_inflight == 0
    finally:
        hole.close()


async def test_first_byte_timeout_retries_elsewhere() -> None:
    port = free_port()
    hole = await _blackhole(port)
    try:
        with fake_engines(()) as (engine,):
            records = [InstanceRecord("hung", f"http://127.0.0.1:{port}", "llama-3-8b"), engine.record("ok")]
            doc = {"retries": {"first_byte_timeout_s": 0.2},
                   "policies": {"first": {"scorers": [], "picker": "max_score"}}}
            async with running_router(records, doc) as server, httpx.AsyncClient() as http:
                # Ties are broken by instance id: "hung" is tried first, then "ok".
                response = await http.post(server.url + "/v1/chat/completions", json=CHAT)
                assert response.status_code == 200
                assert response.headers["x-tokenyard-instance"] == "ok"
    finally:
        hole.close()


async def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    registry = InstanceRegistry()
    registry.upsert(InstanceRecord("i", "http://127.0.0.1:1", "m"))
    monitor = HealthMonitor(registry, HealthConfig(eject_after_failures=3, eject_s=0.05, max_eject_s=1.0),
                            RouterMetrics())
    state = registry.get("i")[1]
    monitor.on_failure("i", "boom")
    monitor.on_failure("i", "boom")
    assert state.healthy and monitor.breaker("i").state == CLOSED
    monitor.on_failure("i", "boom")
    assert not state.healthy and monitor.breaker("i").state == OPEN
    for _ in range(200):  # the ejection timer fires on the loop
        if monitor.breaker("i").state == HALF_OPEN:
            break
        await asyncio.sleep(0.01)
    assert monitor.breaker("i").state == HALF_OPEN and state.healthy
    monitor.on_failure("i", "still broken")  # one failure while half-open reopens at once
    assert monitor.breaker("i").state == OPEN and not state.healthy
    assert monitor.breaker("i").ejections == 2  # the second ejection lasts twice as long
    for _ in range(200):
        if monitor.breaker("i").state == HALF_OPEN:
            break
        await asyncio.sleep(0.01)
    monitor.on_success("i")
    assert monitor.breaker("i").state == CLOSED and state.healthy
    await monitor.stop()


async def test_active_health_check_marks_a_dead_engine_down_and_back_up() -> None:
    with fake_engines(()) as (engine,):
        registry = InstanceRegistry()
        registry.upsert(engine.record("e"))
        monitor = HealthMonitor(registry, HealthConfig(eject_after_failures=2, timeout_s=0.5), RouterMetrics())
        assert await monitor.check_once("e", engine.url)
        engine.kill()
        assert not await monitor.check_once("e", engine.url)
        assert registry.get("e")[1].healthy  # one failure is not enough
        assert not await monitor.check_once("e", engine.url)
        assert not registry.get("e")[1].healthy
        revived = FakeEngine()
        try:
            registry.upsert(InstanceRecord("e", revived.url, "llama-3-8b"))
            assert await monitor.check_once("e", revived.url)
            assert registry.get("e")[1].healthy
        finally:
            revived.kill()
        await monitor.stop()


def test_retry_budget_allows_a_ratio_of_requests_plus_a_floor() -> None:
    budget = RetryBudget(ratio=0.5, min_per_s=0.0, burst=100.0, tokens=0.0, updated_s=0.0)
    assert not budget.try_spend(now_s=0.0)
    for _ in range(4):
        budget.on_request()
    assert budget.try_spend(now_s=0.0) and budget.try_spend(now_s=0.0)
    assert not budget.try_spend(now_s=0.0)
    floor = RetryBudget(ratio=0.0, min_per_s=2.0, burst=100.0, tokens=0.0, updated_s=0.0)
    assert floor.try_spend(now_s=0.5) and not floor.try_spend(now_s=0.5)


async def test_exhausted_retry_budget_stops_retries() -> None:
    with fake_engines((), ()) as (first, second):
        records = [first.record("a"), second.record("b")]
        doc = {"tenants": {"t": {"api_keys": ["k"], "retry_budget": {"ratio": 0.0, "min_per_s": 0.0, "burst": 1}}},
               "policies": {"by_id": {"scorers": []}}}
        async with running_router(records, doc) as server:
            server.router.tenants.tenants["t"].retry_budget.tokens = 0.0
            first.kill()  # "a" is tried first (ties by id); no budget to retry on "b"
            async with httpx.AsyncClient(headers={"Authorization": "Bearer k"}) as http:
                response = await http.post(server.url + "/v1/chat/completions", json=CHAT)
            assert response.status_code == 502
            assert "retry budget" in response.json()["error"]["message"]


class EmulatedEngineProcess:
    """`tokenyard engine` (the real emulated engine) in its own process, to be killed."""

    def __init__(self, instance_id: str, gpu: str, time_scale: float) -> None:
        import subprocess
        import sys
        import time

        from tests.conftest import REPO_ROOT

        self.instance_id = instance_id
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "engine", "--gpu", gpu, "--model", "llama-3-8b", "--port",
             str(self.port), "--instance-id", instance_id, "--time-scale", str(time_scale)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, f"{instance_id} did not start"
            time.sleep(0.1)

    def record(self) -> InstanceRecord:
        return InstanceRecord(self.instance_id, self.url, "llama-3-8b")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def test_real_emulated_engines_killed_before_and_during_a_stream() -> None:
    first = EmulatedEngineProcess("a-first", "L4", time_scale=1.0)
    second = EmulatedEngineProcess("b-second", "L4", time_scale=1.0)
    try:
        async with running_router([first.record(), second.record()]) as server:
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            # Mid-stream: the engine serving a long stream dies (SIGKILL); the router continues
            # the stream on the survivor (router/splice.py): no error, no cut.
            stream = await client.chat.completions.with_raw_response.create(
                model="llama-3-8b", messages=[{"role": "user", "content": "tell me a long story"}],
                max_tokens=400, stream=True)
            victim = first if stream.headers["x-tokenyard-instance"] == "a-first" else second
            survivor = second if victim is first else first
            received = 0
            finish = None
            async for chunk in stream.parse():
                received += 1
                finish = chunk.choices[0].finish_reason if chunk.choices else finish
                if received == 3:
                    victim.kill()
            assert received > 3 and finish in ("stop", "length")
            assert server.router.splicer.stats.failovers == 1
            # Before the first byte: requests now fail over to the survivor.
            for _ in range(4):
                reply = await client.chat.completions.with_raw_response.create(
                    model="llama-3-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
                assert reply.headers["x-tokenyard-instance"] == survivor.instance_id
                assert reply.parse().choices[0].message.content
            # These engines run FCFS (vLLM refuses a priority then): the router learned to omit it.
            assert server.router._no_priority == {"a-first", "b-second"}
    finally:
        first.kill()
        second.kill()


async def test_removed_instance_finishes_its_running_stream() -> None:
    with fake_engines(("--token-delay-s", "0.02"),) as (engine,):
        async with running_router([engine.record("gone")]) as server, httpx.AsyncClient() as http:
            body = {"model": "llama-3-8b", "prompt": "p", "max_tokens": 20, "stream": True}
            async with http.stream("POST", server.url + "/v1/completions", json=body) as running:
                lines = running.aiter_lines()
                assert (await anext(lines)).startswith("data: {")
                server.router.registry.remove("gone")  # discovery dropped it mid-stream
                rest = [line async for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            assert sum(1 for line in rest if '"text"' in line) == 19
            response = await http.post(server.url + "/v1/completions", json={**body, "stream": False})
            assert response.status_code == 404  # nothing serves the model any more
