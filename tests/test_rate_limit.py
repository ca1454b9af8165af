"""Per-tenant token buckets: the pure decision, its Redis Lua twin (real Redis at
127.0.0.1:6379, a unique prefix) giving the same verdicts, and a shared limit holding
across two limiters (two replicas) under concurrent load."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator

import pytest

from router.rate_limiter import LocalRateLimiter, RedisRateLimiter, estimate_tokens
from router.state import RedisStateStore
from scheduler.rate_limit import BucketState, RateLimit, limits_from_policy, take_all

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_bucket_bursts_a_minute_then_runs_at_the_rate() -> None:
    limits = {"requests": RateLimit.per_minute(60)}  # 1 per second after a burst of 60
    states: dict[str, BucketState | None] = {}
    admitted = 0
    for _ in range(100):
        verdict = take_all(limits, states, {"requests": 1}, now_s=0.0)
        states = dict(verdict.states)
        admitted += verdict.allowed
    assert admitted == 60
    refused = take_all(limits, states, {"requests": 1}, now_s=0.5)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(0.5)
    assert take_all(limits, states, {"requests": 1}, now_s=1.0).allowed


def test_all_or_nothing_and_oversized_costs() -> None:
    limits = {"requests": RateLimit.per_minute(10), "tokens": RateLimit.per_minute(600)}
    first = take_all(limits, {}, {"requests": 1, "tokens": 500}, 0.0)
    assert first.allowed
    second = take_all(limits, first.states, {"requests": 1, "tokens": 500}, 0.0)
    # Refused on tokens; the requests bucket is not drawn from either.
    assert not second.allowed and second.states["requests"].tokens == pytest.approx(9)
    assert second.retry_after_s == pytest.approx(400 / 10)  # 400 tokens short at 10 tokens/s
    # A request above a minute's allowance waits for a full bucket rather than never passing.
    huge = take_all({"tokens": RateLimit.per_minute(600)}, {}, {"tokens": 10_000}, 0.0)
    assert huge.allowed and huge.states["tokens"].tokens == pytest.approx(0)


def test_limits_from_policy_and_token_estimate() -> None:
    assert set(limits_from_policy({"requests_per_minute": 5, "tokens_per_minute": 0})) == {"requests"}
    assert limits_from_policy(None) == {}
    assert estimate_tokens({"max_tokens": 100, "prompt": "x" * 400}) == 200
    assert estimate_tokens({"messages": [{"role": "user", "content": "abcd" * 10}]}) == 256 + 10


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStateStore]:
    store = RedisStateStore(REDIS_URL, prefix=f"tytest:{uuid.uuid4().hex[:10]}:")
    yield store
    await store.delete_all()
    await store.close()


async def test_lua_bucket_gives_the_pure_functions_verdicts(redis_store: RedisStateStore) -> None:
    rng = random.Random(7)
    limits = {"requests": RateLimit.per_minute(30), "tokens": RateLimit.per_minute(3000)}
    redis_limiter = RedisRateLimiter(redis_store)
    states: dict[str, BucketState | None] = {}
    now_s = 1000.0
    verdicts = []
    for _ in range(300):
        now_s += rng.choice((0.0, 0.0, 0.25, 1.0, 3.0))
        costs = {"requests": 1.0, "tokens": float(rng.randint(1, 400))}
        expected = take_all(limits, states, costs, now_s)
        states = dict(expected.states)
        allowed, wait_s = await redis_limiter.check("acme", limits, costs, now_s)
        assert allowed == expected.allowed
        assert wait_s == pytest.approx(expected.retry_after_s, rel=1e-9, abs=1e-9)
        verdicts.append(allowed)
    assert 30 < sum(verdicts) < 290  # the sequence exercised both outcomes


async def test_shared_limit_holds_across_two_replicas_under_concurrent_load(redis_store: RedisStateStore) -> None:
    other = RedisStateStore(redis_store.url, prefix=redis_store.prefix)  # a second replica's connection
    try:
        # A check past its timeout admits (fails open, by design); on a loaded box 200
        # concurrent checks can all pass 1 s, so this test of the shared bucket gives them 60 s.
        replicas = [RedisRateLimiter(redis_store, timeout_s=60.0), RedisRateLimiter(other, timeout_s=60.0)]
        limits = {"requests": RateLimit.per_minute(50)}
        results = await asyncio.gather(*(replicas[i % 2].check("acme", limits, {"requests": 1})
                                         for i in range(200)))
        assert sum(ok for ok, _ in results) == 50  # one minute's burst, whichever replica asked
        assert all(wait > 0 for ok, wait in results if not ok)
        # Another tenant has its own bucket.
        assert (await replicas[1].check("globex", limits, {"requests": 1}))[0]
    finally:
        await other.close()


async def test_a_check_past_its_timeout_admits() -> None:
    """A store that accepts the connection and never answers: the check admits after its timeout."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    store = RedisStateStore(f"redis://127.0.0.1:{port}/0", prefix="x:")
    try:
        limiter = RedisRateLimiter(store, timeout_s=0.2)
        started = asyncio.get_running_loop().time()
        assert await limiter.check("a", {"requests": RateLimit.per_minute(1)}, {"requests": 1}) == (True, 0.0)
        assert asyncio.get_running_loop().time() - started < 30  # it did not wait on the socket's own timeout
    finally:
        await store.close()
        silent.close()


async def test_local_limiter_and_redis_down_admits() -> None:
    local = LocalRateLimiter()
    limits = {"requests": RateLimit.per_minute(2)}
    assert [(await local.check("a", limits, {"requests": 1}, 0.0))[0] for _ in range(3)] == [True, True, False]
    down = RedisStateStore("redis://127.0.0.1:1/0", prefix="x:")
    try:
        assert await RedisRateLimiter(down).check("a", limits, {"requests": 1}) == (True, 0.0)
    finally:
        await down.close()


# -- through the router's front door ------------------------------------------------------
@pytest.mark.parametrize("backend", ["file", "redis"])
async def test_router_answers_429_with_retry_after(backend: str, tmp_path: object) -> None:
    import httpx

    from router.policy_versions import PolicyVersions
    from router.state import open_store
    from tests.test_router_support import fake_engines, running_router

    prefix = f"tytest:{uuid.uuid4().hex[:10]}:"
    url = f"file://{tmp_path}/state.db" if backend == "file" else f"{REDIS_URL}?prefix={prefix}"
    doc = {"tenants": {"acme": {"api_keys": ["sk-acme"]}, "globex": {"api_keys": ["sk-globex"]}}}
    body = {"model": "llama-3-8b", "prompt": "p", "max_tokens": 2}
    with fake_engines(()) as (engine,):
        async with running_router([engine.record("e0")], doc, store=open_store(url)) as a, \
                running_router([engine.record("e0")], doc, store=open_store(url)) as b, \
                httpx.AsyncClient() as http:
            writer = open_store(url)
            await PolicyVersions(writer).commit("acme", {"rate_limits": {"requests_per_minute": 4}},
                                                expected_version=None, author="t", reason="cap acme")
            await writer.close()
            for server in (a, b):
                await server.router.apply_policies()
            statuses, retry_after = [], set()
            # Redis: one bucket shared by both replicas, asked alternately. The embedded
            # default keeps a bucket per router process, so one replica is asked.
            servers = (a, b) if backend == "redis" else (a,)
            for i in range(8):
                server = servers[i % len(servers)]
                got = await http.post(server.url + "/v1/completions", json=body,
                                      headers={"Authorization": "Bearer sk-acme"})
                statuses.append(got.status_code)
                if got.status_code == 429:
                    retry_after.add(got.headers["retry-after"])
                    assert got.json()["error"]["code"] == "rate_limit_exceeded"
            other = await http.post(a.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sk-globex"})
    assert other.status_code == 200  # only acme is limited
    assert statuses == [200] * 4 + [429] * 4
    assert retry_after and retry_after <= {"15", "14"}  # 60 s / 4 requests per token


@pytest.mark.parametrize("backend", ["file", "redis"])
async def test_max_concurrent_holds_and_slots_come_back(backend: str, tmp_path: object) -> None:
    import httpx

    from router.policy_versions import PolicyVersions
    from router.state import open_store
    from tests.test_router_support import fake_engines, running_router

    url = (f"file://{tmp_path}/state.db" if backend == "file"
           else f"{REDIS_URL}?prefix=tytest:{uuid.uuid4().hex[:10]}:")
    doc = {"tenants": {"acme": {"api_keys": ["sk-acme"]}}}
    body = {"model": "llama-3-8b", "prompt": "p", "max_tokens": 5}
    auth = {"Authorization": "Bearer sk-acme"}
    with fake_engines(("--token-delay-s", "0.1")) as (engine,):  # ~0.5 s per request
        async with running_router([engine.record("e0")], doc, store=open_store(url)) as a, \
                running_router([engine.record("e0")], doc, store=open_store(url)) as b, \
                httpx.AsyncClient(timeout=10) as http:
            writer = open_store(url)
            await PolicyVersions(writer).commit("acme", {"rate_limits": {"max_concurrent": 2}},
                                                expected_version=None, author="t", reason="two at a time")
            await writer.close()
            for server in (a, b):
                await server.router.apply_policies()
            servers = (a, b) if backend == "redis" else (a,)  # Redis: the slots are shared
            answers = await asyncio.gather(*(http.post(servers[i % len(servers)].url + "/v1/completions",
                                                       json=body, headers=auth) for i in range(5)))
            codes = sorted(r.status_code for r in answers)
            assert codes == [200, 200, 429, 429, 429]
            refused = next(r for r in answers if r.status_code == 429)
            assert refused.headers["retry-after"] == "1" and "2 concurrent requests" in refused.text
            # Every slot was given back when its request ended (refused ones too).
            again = await asyncio.gather(*(http.post(servers[i % len(servers)].url + "/v1/completions",
                                                     json=body, headers=auth) for i in range(2)))
            assert [r.status_code for r in again] == [200, 200]
