"""Leader election (router/leader.py) with the official client against the loopback API server.

Two electors share one Lease on a real HTTP server that enforces resourceVersion
(409 Conflict), AlreadyExists on create and 404 on a missing Lease. Time is a shared fake
clock, so lease expiry is exercised without waiting it out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from router.k8s_loopback import LoopbackKubeAPI
from router.leader import LeaderElectionSettings, LeaseElector
from tokenyard.config import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now_s = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def api() -> Iterator[LoopbackKubeAPI]:
    server = LoopbackKubeAPI().start()
    yield server
    server.stop()


def coordination(api: LoopbackKubeAPI) -> Any:
    return client.CoordinationV1Api(client.ApiClient(client.Configuration(host=api.host)))


def elector(api: LoopbackKubeAPI, identity: str, clock: Clock, **kw: Any) -> LeaseElector:
    settings = LeaderElectionSettings(namespace="llm", lease_name="ty-controlplane", identity=identity,
                                      lease_duration_s=15, renew_deadline_s=10, retry_period_s=2, **kw)
    return LeaseElector(settings, coordination(api), clock=clock)


def lease(api: LoopbackKubeAPI) -> dict[str, Any]:
    found = api.get("leases", "ty-controlplane", "llm")
    assert found is not None
    return found


def test_acquire_renew_and_a_follower(api: LoopbackKubeAPI) -> None:
    clock = Clock()
    a, b = elector(api, "pod-a", clock), elector(api, "pod-b", clock)
    assert api.get("leases", "ty-controlplane", "llm") is None
    assert a.step() is True  # created with a as holder
    spec = lease(api)["spec"]
    assert (spec["holderIdentity"], spec["leaseDurationSeconds"], spec["leaseTransitions"]) == ("pod-a", 15, 0)
    assert b.step() is False and b.observed_holder == "pod-a"
    rv = lease(api)["metadata"]["resourceVersion"]
    clock.now_s += 2
    assert a.step() is True  # renewed: a new resourceVersion, a later renewTime
    renewed = lease(api)
    assert renewed["metadata"]["resourceVersion"] != rv and renewed["spec"]["acquireTime"] == spec["acquireTime"]
    assert renewed["spec"]["renewTime"] > spec["renewTime"]
    clock.now_s += 14  # 14 s after a's renewal: still a's
    assert b.step() is False
    assert any(r.startswith("PUT /apis/coordination.k8s.io/v1/namespaces/llm/leases/ty-controlplane")
               for r in api.requests)


def test_create_race_and_update_conflict_are_409s(api: LoopbackKubeAPI) -> None:
    clock = Clock()
    a, b = elector(api, "pod-a", clock), elector(api, "pod-b", clock)
    # Create race: b finds no Lease, a creates it in between, b's create gets AlreadyExists.
    real_read = b.api.read_namespaced_lease

    def read_then_a_creates(*args: Any, **kw: Any) -> Any:
        try:
            return real_read(*args, **kw)
        finally:
            a.step()

    b.api.read_namespaced_lease = read_then_a_creates
    assert b.step() is False and b.stats["conflicts"] == 1 and a.is_leader
    b.api.read_namespaced_lease = real_read
    # Update race: the Lease expired; b reads it, a renews first, b's stale write is a 409.
    clock.now_s += 30

    def read_then_a_renews(*args: Any, **kw: Any) -> Any:
        found = real_read(*args, **kw)
        assert a.step() is True
        return found

    b.api.read_namespaced_lease = read_then_a_renews
    assert b.step() is False and b.stats["conflicts"] == 2
    assert lease(api)["spec"]["holderIdentity"] == "pod-a"


def test_lose_and_regain(api: LoopbackKubeAPI) -> None:
    clock = Clock()
    a, b = elector(api, "pod-a", clock), elector(api, "pod-b", clock)
    assert a.step() and not b.step()
    clock.now_s += 16  # a stopped renewing (paused, partitioned): the Lease expired
    assert b.step() is True
    spec = lease(api)["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("pod-b", 1)
    assert a.step() is False and a.stats["lost"] == 1  # a sees b holding and steps down
    assert b.release() is True and lease(api)["spec"].get("holderIdentity") is None
    assert a.step() is True and lease(api)["spec"]["leaseTransitions"] == 2  # regained without waiting
    assert not b.step()


def test_api_down_keeps_leading_until_the_renew_deadline(api: LoopbackKubeAPI) -> None:
    clock = Clock()
    a = elector(api, "pod-a", clock)
    assert a.step()
    a.api = client.CoordinationV1Api(client.ApiClient(client.Configuration(host="http://127.0.0.1:1")))
    clock.now_s += 5
    assert a.step() is True and a.stats["errors"] == 1  # within the 10 s renew deadline
    clock.now_s += 6
    assert a.step() is False and a.stats["lost"] == 1


async def test_run_calls_back_and_releases_on_stop(api: LoopbackKubeAPI) -> None:
    events: list[str] = []
    settings = LeaderElectionSettings(namespace="llm", lease_name="ty-controlplane", identity="pod-a",
                                      lease_duration_s=3, renew_deadline_s=2, retry_period_s=0.05)
    a = LeaseElector(settings, coordination(api))
    stop = asyncio.Event()

    async def started() -> None:
        events.append("started")

    async def stopped() -> None:
        events.append("stopped")

    task = asyncio.create_task(a.run(started, stopped, stop))
    for _ in range(100):
        if events:
            break
        await asyncio.sleep(0.02)
    assert events == ["started"] and a.stats["rounds"] >= 1
    await asyncio.sleep(0.2)
    assert a.stats["rounds"] >= 3 and a.stats["acquired"] == 1  # renewing, not re-acquiring
    stop.set()
    await asyncio.wait_for(task, 5)
    assert events == ["started", "stopped"] and lease(api)["spec"].get("holderIdentity") is None


def test_settings_from_the_chart_environment() -> None:
    env = {"POD_NAMESPACE": "llm", "POD_NAME": "cp-1", "TOKENYARD_LEASE_NAME": "ty-tokenyard-controlplane",
           "TOKENYARD_LEASE_DURATION_S": "20", "TOKENYARD_LEASE_RENEW_DEADLINE_S": "12",
           "TOKENYARD_LEASE_RETRY_PERIOD_S": "3"}
    s = LeaderElectionSettings.from_env(env)
    assert (s.namespace, s.identity, s.lease_name, s.lease_duration_s, s.renew_deadline_s, s.retry_period_s) == (
        "llm", "cp-1", "ty-tokenyard-controlplane", 20.0, 12.0, 3.0)
    with pytest.raises(ConfigError, match="TOKENYARD_LEASE_DURATION_S: expected a number of seconds"):
        LeaderElectionSettings.from_env({**env, "TOKENYARD_LEASE_DURATION_S": "soon"})
    with pytest.raises(ConfigError, match="retry period < renew deadline < lease duration"):
        LeaderElectionSettings.from_env({**env, "TOKENYARD_LEASE_RENEW_DEADLINE_S": "30"})
