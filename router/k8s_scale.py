"""Pool scaling on Kubernetes: set a pool Deployment's replicas through its scale subresource.

The planner decides how many replicas each pool should have; this module is the actuator
that makes it so, safely:

- `ScaleActuator.set_replicas({pool_name: replicas})` reads each pool's
  `deployments/{name}/scale` and replaces `spec.replicas` with the read `resourceVersion`,
  so a concurrent writer (an operator, an HPA) makes it a 409 Conflict, which is retried
  once on a fresh read rather than overwritten blindly;
- changes are rate-limited per pool (`limit_change`, pure): at most `max_step` replicas
  per change and at least `min_interval_s` between two changes of one pool, so a noisy
  plan cannot thrash GPUs; scaling to the same count is a no-op and not a change;
- `dry_run=True` sends the request with `dryRun=All`: the API server validates it
  (and RBAC is exercised) but nothing is stored.

Only the pools it was given (pool name -> Deployment name, the Helm chart's
TOKENYARD_SCALABLE_DEPLOYMENTS) can be touched, which is also all RBAC allows.
Every outcome is a `ScaleResult` value; an API error for one pool does not stop the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tokenyard.config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScaleLimits:
    max_step: int = 4  # replicas added or removed per change
    min_interval_s: float = 120.0  # between two changes of one pool
    max_replicas: int = 64

    def __post_init__(self) -> None:
        if self.max_step < 1 or self.min_interval_s < 0 or self.max_replicas < 0:
            raise ValueError(f"scale limits: expected max_step >= 1, min_interval_s >= 0, max_replicas >= 0, got "
                             f"{self.max_step}, {self.min_interval_s}, {self.max_replicas}")


@dataclass(frozen=True, slots=True)
class ScaleResult:
    pool: str
    deployment: str
    before: int | None  # replicas read from the scale subresource (None: could not read)
    requested: int
    applied: int | None  # replicas written (None: nothing written)
    reason: str  # "scaled", "unchanged", "rate-limited", "clamped", "dry-run", "error: ..."
    dry_run: bool = False

    @property
    def changed(self) -> bool:
        return self.applied is not None and self.applied != self.before and not self.dry_run


def limit_change(current: int, requested: int, last_change_s: float | None, now_s: float,
                 limits: ScaleLimits) -> tuple[int, str]:
    """The replica count to write now and why (pure): `current` when nothing may change."""
    target = min(max(requested, 0), limits.max_replicas)
    if target == current:
        return current, "unchanged"
    if last_change_s is not None and now_s - last_change_s < limits.min_interval_s:
        return current, "rate-limited"
    step = max(-limits.max_step, min(limits.max_step, target - current))
    applied = current + step
    return applied, "scaled" if applied == requested else "clamped"


def parse_deployments(text: str) -> dict[str, str]:
    """`pool=deployment,pool=deployment` (the chart's TOKENYARD_SCALABLE_DEPLOYMENTS)."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        pool, sep, deployment = item.partition("=")
        if not sep or not pool or not deployment:
            raise ConfigError("TOKENYARD_SCALABLE_DEPLOYMENTS", f"expected pool=deployment[,...], got {item!r}")
        out[pool] = deployment
    return out


class ScaleActuator:
    """`apps_api` is a `kubernetes.client.AppsV1Api`; `deployments` maps pool -> Deployment."""

    def __init__(self, apps_api: Any, namespace: str, deployments: Mapping[str, str], *,
                 limits: ScaleLimits | None = None, dry_run: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api = apps_api
        self.namespace = namespace
        self.deployments = dict(deployments)
        self.limits = limits or ScaleLimits()
        self.dry_run = dry_run
        self.clock = clock
        self._last_change_s: dict[str, float] = {}

    def set_replicas(self, targets: Mapping[str, int]) -> dict[str, ScaleResult]:
        """Move each named pool toward its target, within the limits; one result per pool."""
        results: dict[str, ScaleResult] = {}
        for pool, requested in targets.items():
            deployment = self.deployments.get(pool)
            if deployment is None:
                known = ", ".join(sorted(self.deployments)) or "none"
                results[pool] = ScaleResult(pool, "", None, requested, None,
                                            f"error: unknown pool {pool!r}; scalable pools: {known}")
                continue
            if not isinstance(requested, int) or isinstance(requested, bool) or requested < 0:
                results[pool] = ScaleResult(pool, deployment, None, int(requested or 0), None,
                                            f"error: replicas must be an integer >= 0, got {requested!r}")
                continue
            results[pool] = self._scale_one(pool, deployment, requested)
        return results

    def _scale_one(self, pool: str, deployment: str, requested: int) -> ScaleResult:
        from kubernetes.client.exceptions import ApiException

        before: int | None = None
        for attempt in range(2):  # one retry after a 409 Conflict, on a fresh read
            try:
                scale = self.api.read_namespaced_deployment_scale(deployment, self.namespace)
                before = int(scale.spec.replicas or 0)
                applied, reason = limit_change(before, requested, self._last_change_s.get(pool), self.clock(),
                                               self.limits)
                if applied == before:
                    return ScaleResult(pool, deployment, before, requested, None, reason, self.dry_run)
                scale.spec.replicas = applied
                kwargs = {"dry_run": "All"} if self.dry_run else {}
                written = self.api.replace_namespaced_deployment_scale(deployment, self.namespace, scale, **kwargs)
            except ApiException as exc:
                if exc.status == 409 and attempt == 0:
                    continue
                return ScaleResult(pool, deployment, before, requested, None,
                                   f"error: HTTP {exc.status} {exc.reason}", self.dry_run)
            except Exception as exc:  # unreachable API server and alike: a value, not a crash
                return ScaleResult(pool, deployment, before, requested, None, f"error: {exc}", self.dry_run)
            if self.dry_run:
                return ScaleResult(pool, deployment, before, requested, int(written.spec.replicas), "dry-run", True)
            self._last_change_s[pool] = self.clock()
            log.info("pool scaled", extra={"pool": pool, "deployment": deployment, "from": before, "to": applied,
                                           "requested": requested})
            return ScaleResult(pool, deployment, before, requested, int(written.spec.replicas), reason)
        raise AssertionError("unreachable")
