"""Kubernetes ServiceAccount tokens for the control plane: TokenReview, roles by config.

With `control.token_review` configured, a bearer token that is not one of the control
tokens is sent to the API server's TokenReview (`authentication.k8s.io/v1`, through the
official `kubernetes` client); an authenticated answer names a user (a ServiceAccount is
`system:serviceaccount:<namespace>:<name>`) and its groups, which `roles` maps to the
control roles:

    control:
      tokens_file: ...              # optional with token_review (break-glass tokens)
      token_review:
        api_url: ""                 # empty: in-cluster config (or ~/.kube/config)
        audiences: []               # when set, the token must be issued for one of them
        cache_ttl_s: 30             # an answer (yes or no) is reused this long
        cache_max_entries: 4096     # least recently used entries go first
        timeout_s: 2
        roles:
          - {service_account: ops/oncall, roles: [operator]}   # namespace/name (name may be *)
          - {group: "system:serviceaccounts:platform", roles: [viewer]}
          - {user: "jane@example.com", roles: [admin]}

A principal gets the union of the roles of every rule it matches; none: it is known but
may call nothing (PERMISSION_DENIED, logged). It fails closed: an API server that cannot
be reached, answers an error or times out refuses the call (UNAUTHENTICATED, logged,
rate-limited), and that failure is not cached, so a recovered API server is used at
once. Only SHA-256 digests of tokens are kept in the cache. The control plane's own
ServiceAccount needs `create` on `tokenreviews` (the chart's `router.control.tokenReview`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tokenyard.config import ConfigError, check_keys, get
from tokenyard.logs import RateLimitedLog

log = logging.getLogger(__name__)
_failures = RateLimitedLog(log, interval_s=10.0)

TOKEN_REVIEW_KEYS = ("api_url", "audiences", "cache_ttl_s", "cache_max_entries", "timeout_s", "roles")
MAX_TOKEN_CHARS = 16_384  # a projected ServiceAccount JWT is ~1 KB; refuse anything absurd unasked
MAX_CONCURRENT_REVIEWS = 8  # API server calls in flight at once (each in a thread)


@dataclass(frozen=True, slots=True)
class RoleRule:
    """One mapping: a ServiceAccount (`namespace/name`, name may be `*`), a group or a user."""

    roles: frozenset[str]
    service_account: str | None = None
    group: str | None = None
    user: str | None = None

    def matches(self, username: str, groups: frozenset[str]) -> bool:
        if self.user is not None:
            return username == self.user
        if self.group is not None:
            return self.group in groups
        assert self.service_account is not None
        namespace, _, name = self.service_account.partition("/")
        prefix = f"system:serviceaccount:{namespace}:"
        return username.startswith(prefix) and (name == "*" or username[len(prefix):] == name)


@dataclass(frozen=True, slots=True)
class TokenReviewSettings:
    roles: tuple[RoleRule, ...]
    api_url: str = ""
    audiences: tuple[str, ...] = ()
    cache_ttl_s: float = 30.0
    cache_max_entries: int = 4096
    timeout_s: float = 2.0

    def roles_of(self, username: str, groups: frozenset[str]) -> frozenset[str]:
        out: set[str] = set()
        for rule in self.roles:
            if rule.matches(username, groups):
                out |= rule.roles
        return frozenset(out)


def parse_token_review(raw: Any, where: str, parse_roles: Callable[[Any, str], frozenset[str]]) -> TokenReviewSettings:
    """The `control.token_review` section; every error names its key path."""
    if not isinstance(raw, Mapping):
        raise ConfigError(where, "expected {roles: [...], api_url, audiences, cache_ttl_s, cache_max_entries, "
                                 "timeout_s}")
    check_keys(raw, TOKEN_REVIEW_KEYS, where)
    rules = []
    raw_rules = get(raw, "roles", list, where)
    if not raw_rules:
        raise ConfigError(f"{where}.roles", "expected at least one {service_account | group | user, roles} rule: "
                                            "without one no ServiceAccount could do anything")
    for i, item in enumerate(raw_rules):
        at = f"{where}.roles[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(at, "expected {service_account: NAMESPACE/NAME | group: G | user: U, roles: [...]}")
        check_keys(item, ("service_account", "group", "user", "roles"), at)
        subjects = [k for k in ("service_account", "group", "user") if k in item]
        if len(subjects) != 1:
            raise ConfigError(at, "expected exactly one of service_account, group and user")
        subject = get(item, subjects[0], str, at)
        if subjects[0] == "service_account":
            namespace, sep, name = subject.partition("/")
            if not sep or not namespace or not name or "/" in name:
                raise ConfigError(f"{at}.service_account", f"expected NAMESPACE/NAME (NAME may be *), got {subject!r}")
        roles = parse_roles(item.get("roles"), f"{at}.roles")
        rules.append(RoleRule(roles, **{subjects[0]: subject}))
    audiences = get(raw, "audiences", list, where, default=[])
    if not all(isinstance(a, str) and a for a in audiences):
        raise ConfigError(f"{where}.audiences", f"expected a list of non-empty strings, got {audiences!r}")
    ttl_s = get(raw, "cache_ttl_s", float, where, default=30.0, minimum=0.0)
    if ttl_s > 600:
        raise ConfigError(f"{where}.cache_ttl_s", f"expected at most 600 s (a revoked token stays usable this long), "
                                                  f"got {ttl_s}")
    entries = get(raw, "cache_max_entries", int, where, default=4096, minimum=1)
    timeout_s = get(raw, "timeout_s", float, where, default=2.0, minimum=0.05)
    return TokenReviewSettings(tuple(rules), get(raw, "api_url", str, where, default=""), tuple(audiences),
                               ttl_s, min(entries, 1_000_000), timeout_s)


@dataclass(slots=True)
class ReviewStats:
    reviews: int = 0  # calls to the API server
    cache_hits: int = 0
    failures: int = 0  # API server unreachable or erroring (refused: fail closed)
    refused: int = 0  # answered "not authenticated", or for another audience


@dataclass(frozen=True, slots=True)
class Reviewed:
    """What a token is: a principal name and roles, or why it is refused (`refusal`)."""

    name: str = ""
    roles: frozenset[str] = frozenset()
    refusal: str = ""


class TokenReviewCollector:
    """Prometheus counters of a reviewer, read at scrape time:
    `tokenyard_control_token_reviews_total{outcome}`, outcome `reviewed` (asked the API
    server), `cache_hit`, `failed` (API server unreachable or erroring: refused) and
    `refused` (not authenticated, or for another audience)."""

    def __init__(self, reviewer: TokenReviewer) -> None:
        self.reviewer = reviewer

    def describe(self) -> list[Any]:
        return []  # computed per scrape

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("tokenyard_control_token_reviews", "ServiceAccount token checks of the "
                                     "control port, by outcome", labels=["outcome"])
        stats = self.reviewer.stats
        for outcome, value in (("reviewed", stats.reviews), ("cache_hit", stats.cache_hits),
                               ("failed", stats.failures), ("refused", stats.refused)):
            family.add_metric([outcome], value)
        yield family


class TokenReviewer:
    """Asks the API server about tokens, caches the answers (bounded, TTL). `api_client` is a
    `kubernetes.client.ApiClient`; None: built from `settings.api_url` or the in-cluster config."""

    def __init__(self, settings: TokenReviewSettings, api_client: Any = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._api_client = api_client
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Reviewed]] = OrderedDict()
        self._inflight = asyncio.Semaphore(MAX_CONCURRENT_REVIEWS)
        self.stats = ReviewStats()

    def _api(self) -> Any:
        from kubernetes import client, config

        if self._api_client is None:
            if self.settings.api_url:
                self._api_client = client.ApiClient(client.Configuration(host=self.settings.api_url))
            else:
                try:
                    config.load_incluster_config()  # type: ignore[no-untyped-call]  # kubernetes ships no annotations
                except config.ConfigException:
                    config.load_kube_config()  # type: ignore[no-untyped-call]  # kubernetes ships no annotations
                self._api_client = client.ApiClient()
        return client.AuthenticationV1Api(self._api_client)

    async def review(self, token: str) -> Reviewed:
        if len(token) > MAX_TOKEN_CHARS:
            return Reviewed(refusal=f"bearer token longer than {MAX_TOKEN_CHARS} characters")
        digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(digest)
            self.stats.cache_hits += 1
            return hit[1]
        async with self._inflight:
            try:
                self.stats.reviews += 1
                answer = await asyncio.to_thread(self._ask, token)
            except Exception as exc:  # the API server down, slow or erroring: fail closed, uncached
                self.stats.failures += 1
                _failures.warning("review", "token review failed; refusing the call (fail closed)", extra={
                    "api_url": self.settings.api_url or "in-cluster", "error": f"{type(exc).__name__}: {exc}"[:300]})
                return Reviewed(refusal="token review unavailable (the Kubernetes API server did not answer); "
                                        "refused")
        if answer.refusal:
            self.stats.refused += 1
        self._remember(digest, answer, now)
        return answer

    def _remember(self, digest: str, answer: Reviewed, now: float) -> None:
        if self.settings.cache_ttl_s <= 0:
            return
        self._cache[digest] = (now + self.settings.cache_ttl_s, answer)
        self._cache.move_to_end(digest)
        while len(self._cache) > self.settings.cache_max_entries:
            self._cache.popitem(last=False)

    def _ask(self, token: str) -> Reviewed:
        from kubernetes import client

        body = client.V1TokenReview(api_version="authentication.k8s.io/v1", kind="TokenReview",
                                    spec=client.V1TokenReviewSpec(token=token,
                                                                  audiences=list(self.settings.audiences) or None))
        result = self._api().create_token_review(body, _request_timeout=self.settings.timeout_s)
        status = result.status
        if status is None or not status.authenticated or status.user is None:
            detail = (status.error if status is not None else "") or "not authenticated"
            return Reviewed(refusal=f"token review: {detail}"[:300])
        if self.settings.audiences and not set(status.audiences or ()) & set(self.settings.audiences):
            return Reviewed(refusal=f"token review: the token is not for audience {', '.join(self.settings.audiences)}")
        username = str(status.user.username or "")
        groups = frozenset(str(g) for g in (status.user.groups or ()))
        return Reviewed(name=username, roles=self.settings.roles_of(username, groups))

