"""Which instances take traffic: active health checks, outlier ejection, circuit breakers.

An instance gets new requests only while both hold:
- its active health check passes: `GET /health` every `interval_s`; `eject_after_failures`
  consecutive failures mark it down, one success marks it up again;
- its circuit breaker is not open. The breaker counts consecutive failed requests
  (passive outlier detection, from the request path, O(1) per request): that many failures
  open it for `eject_s`, doubled on each repeated ejection up to `max_eject_s`; then it is
  half-open (traffic flows again) and the next outcome closes it or reopens it at once.
The verdict is written to `InstanceState.healthy` in the registry, which the dispatch
filter `healthy` reads. Draining is separate (`InstanceState.draining`): a draining
instance keeps serving what it runs and gets nothing new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from router.config import HealthConfig
from router.metrics import RouterMetrics
from router.proxy import PoolSet, UpstreamError
from router.registry import InstanceRegistry

log = logging.getLogger(__name__)

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
MAX_CHECKS_PER_S = 100.0
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half-open", OPEN: "open"}


@dataclass(slots=True)
class Breaker:
    state: int = CLOSED
    consecutive_failures: int = 0
    ejections: int = 0
    open_until_s: float = 0.0
    check_ok: bool = True  # verdict of the active health check
    check_failures: int = 0
    timer: asyncio.TimerHandle | None = None


class HealthMonitor:
    def __init__(self, registry: InstanceRegistry, config: HealthConfig, metrics: RouterMetrics,
                 pools: PoolSet | None = None) -> None:
        self.registry = registry
        self.config = config
        self.metrics = metrics
        self.pools = pools or PoolSet(connect_timeout_s=config.timeout_s)
        self._breakers: dict[str, Breaker] = {}
        self._task: asyncio.Task[None] | None = None

    def breaker(self, instance_id: str) -> Breaker:
        found = self._breakers.get(instance_id)
        if found is None:
            found = self._breakers[instance_id] = Breaker()
        return found

    # -- passive (request path) -----------------------------------------------------------
    def on_success(self, instance_id: str) -> None:
        breaker = self._breakers.get(instance_id)
        if breaker is None or (breaker.state == CLOSED and breaker.consecutive_failures == 0):
            return
        breaker.consecutive_failures = 0
        if breaker.state == HALF_OPEN:
            breaker.state = CLOSED
            breaker.ejections = 0
            log.info("circuit closed", extra={"instance": instance_id})
            self._publish(instance_id, breaker)

    def on_failure(self, instance_id: str, reason: str) -> None:
        breaker = self.breaker(instance_id)
        breaker.consecutive_failures += 1
        if breaker.state == HALF_OPEN or (
            breaker.state == CLOSED and breaker.consecutive_failures >= self.config.eject_after_failures
        ):
            self._open(instance_id, breaker, reason)

    def _open(self, instance_id: str, breaker: Breaker, reason: str) -> None:
        eject_s = min(self.config.max_eject_s, self.config.eject_s * (2 ** breaker.ejections))
        breaker.state = OPEN
        breaker.ejections += 1
        breaker.open_until_s = time.monotonic() + eject_s
        if breaker.timer is not None:
            breaker.timer.cancel()
        breaker.timer = asyncio.get_running_loop().call_later(eject_s, self._half_open, instance_id)
        log.warning("circuit opened: instance ejected", extra={
            "instance": instance_id, "reason": reason, "eject_s": eject_s,
            "consecutive_failures": breaker.consecutive_failures})
        self._publish(instance_id, breaker)

    def _half_open(self, instance_id: str) -> None:
        breaker = self._breakers.get(instance_id)
        if breaker is None or breaker.state != OPEN:
            return
        breaker.state = HALF_OPEN
        breaker.timer = None
        log.info("circuit half-open", extra={"instance": instance_id})
        self._publish(instance_id, breaker)

    def _publish(self, instance_id: str, breaker: Breaker) -> None:
        healthy = breaker.check_ok and breaker.state != OPEN
        self.registry.mark_health(instance_id, healthy)
        self.metrics.circuit_state.labels(instance_id).set(breaker.state)
        self.metrics.instance_healthy.labels(instance_id).set(1 if healthy else 0)

    def forget(self, instance_id: str) -> None:
        breaker = self._breakers.pop(instance_id, None)
        if breaker is not None and breaker.timer is not None:
            breaker.timer.cancel()

    # -- active checks --------------------------------------------------------------------
    async def check_once(self, instance_id: str, url: str) -> bool:
        try:
            pool = self.pools.get(url)
            response = await pool.request("GET", "/health", headers_timeout_s=self.config.timeout_s)
            await response.read_limited(1 << 20, self.config.timeout_s)  # a health answer is tiny
            ok = 200 <= response.status < 300
        except (UpstreamError, ValueError):
            ok = False
        breaker = self.breaker(instance_id)
        before = breaker.check_ok
        if ok:
            breaker.check_failures = 0
            breaker.check_ok = True
        else:
            breaker.check_failures += 1
            if breaker.check_failures >= self.config.eject_after_failures:
                breaker.check_ok = False
        if before != breaker.check_ok:
            log.warning("health check %s", "passing" if breaker.check_ok else "failing",
                        extra={"instance": instance_id, "url": url})
            self._publish(instance_id, breaker)
        return ok

    async def run(self) -> None:
        while True:
            records = self.registry.records()
            if records:
                await asyncio.gather(*(self.check_once(r.instance_id, r.url) for r in records),
                                     return_exceptions=True)
            # At most MAX_CHECKS_PER_S probes a second: a large fleet is probed less often
            # (passive ejection still reacts on the first failed requests).
            await asyncio.sleep(max(self.config.interval_s, len(records) / MAX_CHECKS_PER_S))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="health-checks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for breaker in self._breakers.values():
            if breaker.timer is not None:
                breaker.timer.cancel()
        self.pools.close()
