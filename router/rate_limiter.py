"""Where per-tenant rate-limit buckets live: in memory (embedded default) or in Redis
(shared by every router replica). The decision is scheduler/rate_limit.py `take_all`;
the Redis script below is the same arithmetic run inside Redis, so that a check and its
draw are one atomic step across replicas, on Redis's clock (replicas' clocks may differ).

`check(tenant, limits, costs)` answers `(allowed, retry_after_s)`. If Redis cannot be
reached the request is admitted and a warning logged (rate-limited): a store outage must
not become a full outage of the fleet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from router.state import RedisStateStore, StateStore
from scheduler.rate_limit import BucketState, RateLimit, take_all
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

    def __init__(self, store: RedisStateStore) -> None:
        self.store = store
        self._take = store._redis.register_script(_TAKE_LUA)

    async def check(self, tenant: str, limits: Mapping[str, RateLimit], costs: Mapping[str, float],
                    now_s: float | None = None) -> tuple[bool, float]:
        args: list[Any] = ["" if now_s is None else repr(float(now_s)), _BUCKET_IDLE_TTL_MS]
        for bucket, limit in limits.items():
            args += [bucket, repr(limit.capacity), repr(limit.refill_per_s), repr(float(costs.get(bucket, 0.0)))]
        try:
            allowed, wait = await asyncio.wait_for(
                self._take(keys=[f"{self.store.prefix}rl:{tenant}"], args=args), timeout=1.0)
        except Exception as exc:  # Redis down or slow: admit (see the module docstring)
            _warnings.warning("rate-limit:unavailable", "rate limit store unavailable; admitting",
                              extra={"tenant": tenant, "error": str(exc)})
            return True, 0.0
        return bool(int(allowed)), float(wait)


RateLimiter = LocalRateLimiter | RedisRateLimiter


def build_rate_limiter(store: StateStore | None) -> RateLimiter:
    return RedisRateLimiter(store) if isinstance(store, RedisStateStore) else LocalRateLimiter()
