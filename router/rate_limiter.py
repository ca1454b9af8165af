"""Where per-tenant rate-limit buckets live: in memory (embedded default) or in Redis
(shared by every router replica). The decision is scheduler/rate_limit.py `take_all`;
the Redis script below is the same arithmetic run inside Redis, so that a check and its
draw are one atomic step across replicas, on Redis's clock (replicas' clocks may differ).

`check(tenant, limits, costs)` answers `(allowed, retry_after_s)`; `acquire`/`release`
hold one of a tenant's `max_concurrent` slots for a request (in Redis a slot is a lease
that ends by itself, so a replica that dies cannot leak it). If Redis cannot be
reached the request is admitted and a warning logged (rate-limited): a store outage must
not become a full outage of the fleet.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
import uuid
from collections.abc import Mapping
from typing import Any

from router.errors import error_body
from router.state import RedisStateStore, StateStore
from scheduler.rate_limit import BucketState, RateLimit, limits_from_policy, take_all
from tokenyard.logs import RateLimitedLog

log = logging.getLogger(__name__)
_warnings = RateLimitedLog(log, interval_s=10.0)

_BUCKET_IDLE_TTL_MS = 10 * 60 * 1000  # a bucket left alone this long is full again anyway
MAX_LOCAL_TENANTS = 100_000  # bounded memory: the oldest buckets go first beyond this


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """Tokens a request is charged before it runs: its output cap plus ~4 characters per
    prompt token (the router does not tokenize)."""
    output = body.get("max_completion_tokens") or body.get("max_tokens") or 256
    prompt = body.get("prompt")
    if prompt is None:
        prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", ()) if isinstance(m, dict))
    chars = len(prompt) if isinstance(prompt, str) else len(str(prompt))
    return int(output if isinstance(output, int) else 256) + chars // 4


class LocalRateLimiter:
    """Buckets in this process (one router; several processes each hold their own)."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], BucketState] = {}
        self._slots: dict[str, set[str]] = {}

    async def check(self, tenant: str, limits: Mapping[str, RateLimit], costs: Mapping[str, float],
                    now_s: float | None = None) -> tuple[bool, float]:
        now_s = time.monotonic() if now_s is None else now_s
        verdict = take_all(limits, {b: self._states.get((tenant, b)) for b in limits}, costs, now_s)
        for bucket, state in verdict.states.items():
            self._states[(tenant, bucket)] = state
        if len(self._states) > MAX_LOCAL_TENANTS:
            for key in list(self._states)[:len(self._states) - MAX_LOCAL_TENANTS]:
                del self._states[key]
        return verdict.allowed, verdict.retry_after_s

    async def acquire(self, tenant: str, request_id: str, max_concurrent: int, lease_s: float) -> bool:
        """A concurrency slot of the tenant (True: taken; `release` gives it back)."""
        held = self._slots.setdefault(tenant, set())
        if len(held) >= max_concurrent:
            return False
        held.add(request_id)
        return True

    async def release(self, tenant: str, request_id: str) -> None:
        held = self._slots.get(tenant)
        if held is not None:
            held.discard(request_id)
            if not held:
                del self._slots[tenant]


# A tenant's requests in flight across replicas: a sorted set of request ids scored by
# lease end, so the slots of a replica that died free themselves when their lease ends.
# KEYS[1]: the set. ARGV: max, lease ms, request id. Returns 1 when the slot is taken.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


# KEYS[1]: the tenant's hash. ARGV: now_s ('' = Redis TIME), idle TTL ms, then per bucket:
# name, capacity, refill_per_s, cost. Returns {allowed, retry_after_s as a string}.
# Mirrors scheduler.rate_limit.take_all; change both together.
_TAKE_LUA = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local n = (#ARGV - 2) / 4
local tokens, updated, caps, costs, refills = {}, {}, {}, {}, {}
local wait = 0
for i = 1, n do
  local base = 2 + (i - 1) * 4
  local name, cap, refill = ARGV[base + 1], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local cost = math.min(tonumber(ARGV[base + 4]), cap)
  local held = tonumber(redis.call('HGET', KEYS[1], name .. ':t'))
  local at = tonumber(redis.call('HGET', KEYS[1], name .. ':u'))
  if held == nil or at == nil then
    held, at = cap, now
  else
    local elapsed = now - at
    if elapsed < 0 then elapsed = 0 end
    held = math.min(cap, held + elapsed * refill)
    if now > at then at = now end
  end
  tokens[i], updated[i], caps[i], costs[i], refills[i] = held, at, cap, cost, refill
  local short = cost - held
  if short > 1e-9 then
    local w = math.huge
    if refill > 0 then w = short / refill end
    if w > wait then wait = w end
  end
end
local allowed = 1
if wait > 0 then allowed = 0 end
for i = 1, n do
  local base = 2 + (i - 1) * 4
  local held = tokens[i]
  if allowed == 1 then held = held - costs[i] end
  redis.call('HSET', KEYS[1], ARGV[base + 1] .. ':t', string.format('%.17g', held),
             ARGV[base + 1] .. ':u', string.format('%.17g', updated[i]))
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {allowed, string.format('%.17g', wait)}
"""


class RedisRateLimiter:
    """Buckets in Redis under the store's prefix (`rl:<tenant>`), one script call per check."""

    def __init__(self, store: RedisStateStore, timeout_s: float = 1.0) -> None:
        self.store = store
        self.timeout_s = timeout_s  # past it a check admits (fails open), as when Redis is down
        self._take = store._redis.register_script(_TAKE_LUA)
        self._acquire = store._redis.register_script(_ACQUIRE_LUA)

    async def check(self, tenant: str, limits: Mapping[str, RateLimit], costs: Mapping[str, float],
                    now_s: float | None = None) -> tuple[bool, float]:
        args: list[Any] = ["" if now_s is None else repr(float(now_s)), _BUCKET_IDLE_TTL_MS]
        for bucket, limit in limits.items():
            args += [bucket, repr(limit.capacity), repr(limit.refill_per_s), repr(float(costs.get(bucket, 0.0)))]
        try:
            allowed, wait = await asyncio.wait_for(
                self._take(keys=[f"{self.store.prefix}rl:{tenant}"], args=args), timeout=self.timeout_s)
        except Exception as exc:  # Redis down or slow: admit (see the module docstring)
            _warnings.warning("rate-limit:unavailable", "rate limit store unavailable; admitting",
                              extra={"tenant": tenant, "error": str(exc)})
            return True, 0.0
        return bool(int(allowed)), float(wait)

    async def acquire(self, tenant: str, request_id: str, max_concurrent: int, lease_s: float) -> bool:
        try:
            taken = await asyncio.wait_for(self._acquire(
                keys=[f"{self.store.prefix}inflight:{tenant}"],
                args=[max_concurrent, max(1, int(lease_s * 1000)), request_id]), timeout=self.timeout_s)
        except Exception as exc:  # as for the buckets: admit while Redis is away
            _warnings.warning("rate-limit:unavailable", "rate limit store unavailable; admitting",
                              extra={"tenant": tenant, "error": str(exc)})
            return True
        return bool(int(taken))

    async def release(self, tenant: str, request_id: str) -> None:
        try:
            await asyncio.wait_for(self.store._redis.zrem(f"{self.store.prefix}inflight:{tenant}", request_id),
                                   self.timeout_s)
        except Exception as exc:  # the lease frees the slot anyway
            _warnings.warning("rate-limit:release", "could not release a concurrency slot; its lease will",
                              extra={"tenant": tenant, "error": str(exc)})


RateLimiter = LocalRateLimiter | RedisRateLimiter


def build_rate_limiter(store: StateStore | None) -> RateLimiter:
    return RedisRateLimiter(store) if isinstance(store, RedisStateStore) else LocalRateLimiter()


# -- the router's front door --------------------------------------------------------------
#: Concurrency slots taken by the request being served: `Router._with_slots` gives them back
#: when the request ends, however it ends.
SLOTS: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar("tokenyard_slots",
                                                                                      default=None)
CONCURRENCY_LEASE_S = 900.0  # a slot held past this (a replica that died) frees itself


async def refuse_over_limits(router: Any, send: Any, tenant: Any, body: Mapping[str, Any],
                             rid_header: list[tuple[bytes, bytes]]) -> bool:
    """Answer 429 + Retry-After (True) when the tenant's Admin policy limits are spent: a
    concurrency slot (held until the request ends), then the request and token buckets."""
    limiter: RateLimiter = router.rate_limiter
    max_concurrent = (tenant.rate_limits or {}).get("max_concurrent")
    held = SLOTS.get()
    if isinstance(max_concurrent, int) and max_concurrent > 0 and held is not None:
        slot_id = uuid.uuid4().hex  # unique across replicas (request ids are only per process)
        if not await limiter.acquire(tenant.name, slot_id, max_concurrent, CONCURRENCY_LEASE_S):
            return await _too_many(router, send, tenant, 1.0, rid_header,
                                   f"{max_concurrent} concurrent requests of tenant '{tenant.name}' are running")
        held.append((tenant.name, slot_id))
    limits = limits_from_policy(tenant.rate_limits)
    if not limits:
        return False
    allowed, wait_s = await limiter.check(tenant.name, limits,
                                          {"requests": 1.0, "tokens": float(estimate_tokens(body))})
    if allowed:
        return False
    return await _too_many(router, send, tenant, wait_s, rid_header, f"rate limit of tenant '{tenant.name}' exceeded")


async def _too_many(router: Any, send: Any, tenant: Any, wait_s: float, rid_header: list[tuple[bytes, bytes]],
                    what: str) -> bool:
    router.metrics.request_done(tenant.name, "", 429)
    retry_after = str(max(1, math.ceil(wait_s)) if math.isfinite(wait_s) else 60).encode()
    await router._send_json(send, 429, error_body(429, f"{what}; retry after {retry_after.decode()} s",
                                                  code="rate_limit_exceeded"),
                            [*rid_header, (b"retry-after", retry_after)])
    return True
