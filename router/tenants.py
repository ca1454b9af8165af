"""Tenants: API keys to tenants, each with an SLO class, a dispatch policy and a retry budget.

Lookup is one dict access per request. The retry budget is Envoy's idea: retries may add
at most `ratio` of the tenant's request rate (plus a small floor of retries per second),
so a dying fleet is not hammered with a multiple of its normal load.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class RetryBudget:
    """Token bucket: each request deposits `ratio` tokens, each retry spends one.

    `min_per_s` tokens also accrue per second so that a quiet tenant can still retry;
    the bucket holds at most `burst` tokens.
    """

    ratio: float = 0.2
    min_per_s: float = 5.0
    burst: float = 50.0
    tokens: float = 10.0
    updated_s: float = field(default_factory=time.monotonic)

    def on_request(self) -> None:
        tokens = self.tokens + self.ratio
        self.tokens = tokens if tokens < self.burst else self.burst

    def try_spend(self, now_s: float | None = None) -> bool:
        now_s = time.monotonic() if now_s is None else now_s
        tokens = self.tokens + (now_s - self.updated_s) * self.min_per_s
        self.updated_s = now_s
        tokens = tokens if tokens < self.burst else self.burst
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False


@dataclass(slots=True)
class Tenant:
    name: str
    slo_class: str = "default"
    policy: str | None = None  # name of a dispatch policy in the router config; None: by SLO class
    retry_budget: RetryBudget = field(default_factory=RetryBudget)
    priority: int | None = None  # set by an Admin policy; None: the SLO class's priority
    rate_limits: dict[str, int] | None = None  # set by an Admin policy (router/rate_limiter.py)


class AuthError(Exception):
    """Missing or unknown API key; the message is safe to show the client."""


class TenantTable:
    """API key -> Tenant. With no keys configured, every request is the anonymous tenant."""

    def __init__(self, tenants: list[tuple[Tenant, list[str]]], anonymous: Tenant | None = None) -> None:
        self._by_key: dict[str, Tenant] = {}
        self.tenants: dict[str, Tenant] = {}
        for tenant, keys in tenants:
            self.tenants[tenant.name] = tenant
            for key in keys:
                self._by_key[key] = tenant
        self.anonymous = anonymous
        # The exact header value `Bearer KEY` of each configured key, for one dict hit on the
        # usual header instead of decode, partition, lower and two strips: 0.10 against 0.30 us
        # per call in plain Python (timeit, docs/benchmarks.md issue 17 stop 24; the
        # instruction benchmark runs without configured keys, so it does not show this).
        # Only keys that header parses back to: latin-1, no surrounding whitespace.
        self._by_header: dict[bytes, Tenant] = {}
        for key, tenant in self._by_key.items():
            if key and key == key.strip() and all(ord(c) < 256 for c in key):
                self._by_header[b"Bearer " + key.encode("latin-1")] = tenant
        # Keys created through the Admin service (router/keys.py KeyCache.tenant_for).
        self.stored_lookup: Callable[[str], str | None] | None = None
        if anonymous is not None:
            self.tenants.setdefault(anonymous.name, anonymous)

    def tenant_for_key(self, key: str) -> str | None:
        tenant = self._by_key.get(key)
        if tenant is None and self.stored_lookup is not None:
            return self.stored_lookup(key)
        return None if tenant is None else tenant.name

    def authenticate(self, authorization: bytes | None) -> Tenant:
        """The tenant for an `Authorization: Bearer KEY` header value."""
        if authorization is None:
            if self.anonymous is not None:
                return self.anonymous
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        found = self._by_header.get(authorization)
        if found is not None:
            return found
        value = authorization.decode("latin-1")
        scheme, _, key = value.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            if self.anonymous is not None:
                return self.anonymous
            raise AuthError("malformed Authorization header: expected 'Bearer <key>'")
        tenant = self._by_key.get(key.strip())
        if tenant is not None:
            return tenant
        name = self.stored_lookup(key.strip()) if self.stored_lookup is not None else None
        if name is not None:
            return self.tenants.setdefault(name, Tenant(name))
        if self.anonymous is not None and not self._by_key:
            return self.anonymous
        raise AuthError("incorrect API key provided")
