"""Per-tenant rate limits as token buckets: the decision, pure (state in, verdict out).

A limit of N per minute is a bucket of N tokens refilled at N/60 per second (a tenant may
burst a minute's worth, then runs at the rate). A request costs one token of the
`requests` bucket and its estimated tokens of the `tokens` bucket; it is admitted only if
every bucket it draws from has enough, and then draws from all of them (all or nothing),
otherwise `retry_after_s` says when the emptiest bucket will have enough.

The router keeps the bucket states at its edge (router/rate_limiter.py): in memory for
the embedded default, in Redis for several replicas, where a Lua script computes exactly
`take_all` (tests/test_rate_limit.py replays random sequences through both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateLimit:
    capacity: float  # tokens the bucket holds at most
    refill_per_s: float

    @classmethod
    def per_minute(cls, amount: float) -> RateLimit:
        return cls(float(amount), float(amount) / 60.0)


@dataclass(frozen=True, slots=True)
class BucketState:
    tokens: float
    updated_s: float


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    states: dict[str, BucketState]  # the states to store (unchanged ones too)
    retry_after_s: float  # 0 when allowed


#: `rate_limits` keys of a tenant policy -> bucket names (router/policy_versions.py RateLimits).
POLICY_BUCKETS = {"requests_per_minute": "requests", "tokens_per_minute": "tokens"}


def limits_from_policy(rate_limits: Mapping[str, object] | None) -> dict[str, RateLimit]:
    """The buckets a tenant policy's `rate_limits` sets (unset ones are unlimited)."""
    out = {}
    for key, bucket in POLICY_BUCKETS.items():
        value = (rate_limits or {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            out[bucket] = RateLimit.per_minute(value)
    return out


def refilled(limit: RateLimit, state: BucketState | None, now_s: float) -> BucketState:
    """The bucket at `now_s` (a new bucket is full; a clock going back refills nothing)."""
    if state is None:
        return BucketState(limit.capacity, now_s)
    elapsed_s = max(0.0, now_s - state.updated_s)
    return BucketState(min(limit.capacity, state.tokens + elapsed_s * limit.refill_per_s), max(now_s, state.updated_s))


def take_all(limits: Mapping[str, RateLimit], states: Mapping[str, BucketState | None],
             costs: Mapping[str, float], now_s: float) -> Verdict:
    """Admit a request costing `costs[bucket]` from each bucket of `limits`, or say when.

    A cost above a bucket's capacity is charged as the whole capacity (a request larger
    than a minute's allowance waits for a full bucket instead of never passing)."""
    current = {name: refilled(limit, states.get(name), now_s) for name, limit in limits.items()}
    wait_s = 0.0
    for name, limit in limits.items():
        cost = min(float(costs.get(name, 0.0)), limit.capacity)
        short = cost - current[name].tokens
        if short > 1e-9:
            wait_s = max(wait_s, short / limit.refill_per_s if limit.refill_per_s > 0 else math.inf)
    if wait_s > 0:
        return Verdict(False, current, wait_s)
    after = {name: BucketState(state.tokens - min(float(costs.get(name, 0.0)), limits[name].capacity),
                               state.updated_s) for name, state in current.items()}
    return Verdict(True, after, 0.0)
