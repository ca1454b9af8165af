"""Leader election through a Kubernetes Lease (coordination.k8s.io/v1), so that of several
control-plane replicas exactly one acts (plans pool sizes, orders migrations).

The algorithm is client-go's `leaderelection` over a `LeaseLock`, through the official
`kubernetes` client:

- a round (`try_acquire_or_renew`) reads the Lease; if it does not exist it is created
  with us as holder (a 409 AlreadyExists means another replica won the race); if another
  holder's `renewTime + leaseDurationSeconds` is still in the future we are a follower;
  otherwise we write ourselves in (a new holder bumps `leaseTransitions` and
  `acquireTime`), with the read `resourceVersion`, so a concurrent writer makes our update
  fail with 409 Conflict and we stay a follower;
- `run()` repeats rounds every `retry_period_s`; a leader that cannot renew within
  `renew_deadline_s` of its last renewal steps down (callbacks say when leadership starts
  and stops), and keeps trying, so it can regain the Lease later;
- `release()` (on shutdown) empties the holder so a successor need not wait the lease out.

Times are compared on this replica's clock against the `renewTime` written by the holder,
as client-go does (clock skew between replicas must stay well under the lease duration).
The blocking client runs on a worker thread (`asyncio.to_thread`), never on the loop.

Settings come from the environment the Helm chart sets (`LeaderElectionSettings.from_env`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tokenyard.config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LeaderElectionSettings:
    namespace: str
    lease_name: str
    identity: str
    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.lease_name or not self.namespace or not self.identity:
            raise ConfigError("leader election", "namespace, lease name and identity are required")
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ConfigError("leader election", "expected 0 < retry period < renew deadline < lease duration, got "
                              f"{self.retry_period_s} / {self.renew_deadline_s} / {self.lease_duration_s} s")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LeaderElectionSettings:
        """TOKENYARD_LEASE_NAME, POD_NAMESPACE, POD_NAME and the TOKENYARD_LEASE_*_S timings."""
        env = os.environ if env is None else env

        def seconds(key: str, default: float) -> float:
            raw = env.get(key)
            if raw is None:
                return default
            try:
                return float(raw)
            except ValueError:
                raise ConfigError(key, f"expected a number of seconds, got {raw!r}") from None

        return cls(namespace=env.get("POD_NAMESPACE", "default"),
                   lease_name=env.get("TOKENYARD_LEASE_NAME", "tokenyard-controlplane"),
                   identity=env.get("POD_NAME") or socket.gethostname(),
                   lease_duration_s=seconds("TOKENYARD_LEASE_DURATION_S", 15.0),
                   renew_deadline_s=seconds("TOKENYARD_LEASE_RENEW_DEADLINE_S", 10.0),
                   retry_period_s=seconds("TOKENYARD_LEASE_RETRY_PERIOD_S", 2.0))


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    text = str(value).replace("Z", "+00:00")
    return dt.datetime.fromisoformat(text).timestamp()


class LeaseElector:
    """One replica's side of the election. `api` is a `kubernetes.client.CoordinationV1Api`;
    `clock()` gives seconds since the epoch (injectable for tests)."""

    def __init__(self, settings: LeaderElectionSettings, api: Any, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.api = api
        self.clock = clock
        self.is_leader = False
        self.last_renewed_s: float | None = None
        self.observed_holder: str | None = None
        self.stats = {"rounds": 0, "acquired": 0, "lost": 0, "conflicts": 0, "errors": 0}

    # -- one round --------------------------------------------------------------------
    def try_acquire_or_renew(self) -> bool:
        """One read-modify-write of the Lease; True if we hold it afterwards."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        s = self.settings
        now_s = self.clock()
        self.stats["rounds"] += 1
        try:
            lease = self.api.read_namespaced_lease(s.lease_name, s.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(metadata=client.V1ObjectMeta(name=s.lease_name, namespace=s.namespace),
                                  spec=self._spec(now_s, now_s, 0))
            try:
                self.api.create_namespaced_lease(s.namespace, body)
            except ApiException as create_exc:
                if create_exc.status == 409:  # another replica created it first
                    self.stats["conflicts"] += 1
                    return self._observe(False, None)
                raise
            return self._observe(True, s.identity, now_s)
        spec = lease.spec
        holder = spec.holder_identity or None
        renewed_s = _seconds(spec.renew_time)
        duration_s = float(spec.lease_duration_seconds or s.lease_duration_s)
        if holder not in (None, s.identity) and renewed_s is not None and renewed_s + duration_s > now_s:
            return self._observe(False, holder)
        transitions = spec.lease_transitions or 0
        acquired_s = _seconds(spec.acquire_time) or now_s
        if holder != s.identity:
            transitions += 1
            acquired_s = now_s
        lease.spec = self._spec(acquired_s, now_s, transitions)
        try:
            # The read resourceVersion rides along: a concurrent writer makes this a 409.
            self.api.replace_namespaced_lease(s.lease_name, s.namespace, lease)
        except ApiException as exc:
            if exc.status == 409:
                self.stats["conflicts"] += 1
                return self._observe(False, holder)
            raise
        return self._observe(True, s.identity, now_s)

    def _spec(self, acquired_s: float, renewed_s: float, transitions: int) -> Any:
        from kubernetes import client

        return client.V1LeaseSpec(holder_identity=self.settings.identity,
                                  lease_duration_seconds=int(round(self.settings.lease_duration_s)),
                                  acquire_time=_utc(acquired_s), renew_time=_utc(renewed_s),
                                  lease_transitions=transitions)

    def _observe(self, holding: bool, holder: str | None, renewed_s: float | None = None) -> bool:
        self.observed_holder = holder
        if holding:
            self.last_renewed_s = renewed_s
        return holding

    def release(self) -> bool:
        """Give the Lease up if we hold it (holder emptied, duration 1 s, as client-go does)."""
        from kubernetes.client.exceptions import ApiException

        s = self.settings
        try:
            lease = self.api.read_namespaced_lease(s.lease_name, s.namespace)
            if lease.spec.holder_identity != s.identity:
                return False
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = _utc(self.clock())
            self.api.replace_namespaced_lease(s.lease_name, s.namespace, lease)
        except ApiException as exc:
            log.warning("releasing the Lease failed", extra={"lease": s.lease_name, "status": exc.status})
            return False
        finally:
            self.is_leader = False
        return True

    # -- the loop ---------------------------------------------------------------------
    def step(self) -> bool:
        """One round plus the leadership bookkeeping; returns whether we lead now."""
        try:
            holding = self.try_acquire_or_renew()
        except Exception as exc:  # the API being unreachable is a failed round, not a crash
            self.stats["errors"] += 1
            log.warning("leader election round failed", extra={"error": str(exc)})
            holding = False
        if holding:
            if not self.is_leader:
                self.stats["acquired"] += 1
                log.info("became leader", extra={"lease": self.settings.lease_name,
                                                 "identity": self.settings.identity})
            self.is_leader = True
        elif self.is_leader:
            # Still within the renew deadline of the last renewal: keep leading and retry;
            # past it, or someone else holds the Lease: step down.
            deadline_ok = (self.last_renewed_s is not None
                           and self.clock() - self.last_renewed_s < self.settings.renew_deadline_s)
            if not deadline_ok or self.observed_holder not in (None, self.settings.identity):
                self.is_leader = False
                self.stats["lost"] += 1
                log.warning("lost leadership", extra={"lease": self.settings.lease_name,
                                                      "holder": self.observed_holder})
        return self.is_leader

    async def run(self, on_started_leading: Callable[[], Awaitable[None]] | None = None,
                  on_stopped_leading: Callable[[], Awaitable[None]] | None = None,
                  stop: asyncio.Event | None = None) -> None:
        """Elect until `stop` is set; releases the Lease on the way out if we hold it."""
        stop = stop or asyncio.Event()
        try:
            while not stop.is_set():
                was_leader = self.is_leader
                leading = await asyncio.to_thread(self.step)
                if leading and not was_leader and on_started_leading is not None:
                    await on_started_leading()
                elif was_leader and not leading and on_stopped_leading is not None:
                    await on_stopped_leading()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.retry_period_s)
        finally:
            if self.is_leader:
                await asyncio.to_thread(self.release)
                if on_stopped_leading is not None:
                    await on_stopped_leading()
