"""The scale actuator (router/k8s_scale.py) with the official client against the loopback API.

The loopback server stores Deployments and serves their autoscaling/v1 scale subresource
with resourceVersion checks (409 Conflict) and `dryRun=All`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes import client

from router.k8s_loopback import LoopbackKubeAPI, make_deployment
from router.k8s_scale import ScaleActuator, ScaleLimits, limit_change, parse_deployments
from tokenyard.config import ConfigError

POOLS = {"l4": "ty-tokenyard-pool-l4", "h100": "ty-tokenyard-pool-h100"}


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def api() -> Iterator[LoopbackKubeAPI]:
    server = LoopbackKubeAPI().start()
    for pool, name in POOLS.items():
        server.apply("deployments", make_deployment(name, 2, {"tokenyard.io/pool": pool}, namespace="llm"))
    yield server
    server.stop()


def actuator(api: LoopbackKubeAPI, clock: Clock, **kw: Any) -> ScaleActuator:
    apps = client.AppsV1Api(client.ApiClient(client.Configuration(host=api.host)))
    return ScaleActuator(apps, "llm", POOLS, clock=clock, **kw)


def replicas(api: LoopbackKubeAPI, pool: str) -> int:
    found = api.get("deployments", POOLS[pool], "llm")
    assert found is not None
    return int(found["spec"]["replicas"])


def test_set_replicas_through_the_scale_subresource(api: LoopbackKubeAPI) -> None:
    clock = Clock()
    act = actuator(api, clock, limits=ScaleLimits(max_step=4, min_interval_s=60))
    results = act.set_replicas({"l4": 5, "h100": 2})
    assert (results["l4"].before, results["l4"].applied, results["l4"].reason, results["l4"].changed) == (
        2, 5, "scaled", True)
    assert (results["h100"].applied, results["h100"].reason, results["h100"].changed) == (None, "unchanged", False)
    assert (replicas(api, "l4"), replicas(api, "h100")) == (5, 2)
    writes = [r for r in api.requests if r.startswith("PUT ")]
    assert writes == ["PUT /apis/apps/v1/namespaces/llm/deployments/ty-tokenyard-pool-l4/scale"]


def test_changes_are_rate_limited_and_clamped(api: LoopbackKubeAPI) -> None:
    clock = Clock()
    act = actuator(api, clock, limits=ScaleLimits(max_step=3, min_interval_s=60, max_replicas=10))
    first = act.set_replicas({"l4": 20})["l4"]
    assert (first.applied, first.reason) == (5, "clamped")  # +3 at most per change
    clock.now_s += 30
    held = act.set_replicas({"l4": 20})["l4"]
    assert (held.before, held.applied, held.reason) == (5, None, "rate-limited") and replicas(api, "l4") == 5
    assert act.set_replicas({"h100": 0})["h100"].applied == 0  # another pool is not held back
    clock.now_s += 31
    assert act.set_replicas({"l4": 20})["l4"].applied == 8
    clock.now_s += 61
    assert act.set_replicas({"l4": 20})["l4"].applied == 10  # max_replicas caps the target


def test_dry_run_validates_without_storing(api: LoopbackKubeAPI) -> None:
    act = actuator(api, Clock(), dry_run=True)
    result = act.set_replicas({"l4": 4})["l4"]
    assert (result.before, result.applied, result.reason, result.dry_run, result.changed) == (
        2, 4, "dry-run", True, False)
    assert replicas(api, "l4") == 2
    assert any("dryRun=All" in r for r in api.requests if r.startswith("PUT "))
    assert actuator(api, Clock(), dry_run=True).set_replicas({"l4": 4})["l4"].reason == "dry-run"  # not rate-limited


def test_a_concurrent_writer_is_a_409_retried_on_a_fresh_read(api: LoopbackKubeAPI) -> None:
    act = actuator(api, Clock())
    real_read = act.api.read_namespaced_deployment_scale
    reads = []

    def read_then_someone_scales(*args: Any, **kw: Any) -> Any:
        scale = real_read(*args, **kw)
        reads.append(scale.spec.replicas)
        if len(reads) == 1:  # an operator scales by hand between our read and our write
            api.apply("deployments", make_deployment(POOLS["l4"], 3, {"tokenyard.io/pool": "l4"}, namespace="llm"))
        return scale

    act.api.read_namespaced_deployment_scale = read_then_someone_scales
    result = act.set_replicas({"l4": 6})["l4"]
    assert reads == [2, 3]  # the second read saw the operator's change
    assert (result.before, result.applied, result.reason) == (3, 6, "scaled") and replicas(api, "l4") == 6


def test_errors_are_values(api: LoopbackKubeAPI) -> None:
    act = actuator(api, Clock())
    results = act.set_replicas({"t4": 1, "l4": -1})
    assert results["t4"].reason == "error: unknown pool 't4'; scalable pools: h100, l4"
    assert results["l4"].reason == "error: replicas must be an integer >= 0, got -1"
    api.delete("deployments", POOLS["h100"], "llm")
    gone = act.set_replicas({"h100": 3})["h100"]
    assert gone.reason == "error: HTTP 404 Not Found" and gone.applied is None
    down = ScaleActuator(client.AppsV1Api(client.ApiClient(client.Configuration(host="http://127.0.0.1:1"))),
                         "llm", POOLS).set_replicas({"l4": 3})["l4"]
    assert down.reason.startswith("error: ") and down.applied is None


def test_parse_deployments_from_the_chart() -> None:
    assert parse_deployments("l4=ty-tokenyard-pool-l4,h100=ty-tokenyard-pool-h100") == POOLS
    assert parse_deployments("") == {}
    with pytest.raises(ConfigError, match="expected pool=deployment"):
        parse_deployments("l4")


@given(current=st.integers(0, 50), requested=st.integers(-5, 80), step=st.integers(1, 8),
       since_s=st.none() | st.floats(0, 500))
def test_limit_change_moves_toward_the_target_within_the_limits(current: int, requested: int, step: int,
                                                               since_s: float | None) -> None:
    limits = ScaleLimits(max_step=step, min_interval_s=100, max_replicas=60)
    last = None if since_s is None else 1000.0 - since_s
    applied, reason = limit_change(current, requested, last, 1000.0, limits)
    target = min(max(requested, 0), 60)
    assert abs(applied - current) <= step
    assert abs(target - applied) <= abs(target - current)  # never away from the target
    if reason == "rate-limited":
        assert since_s is not None and since_s < 100 and applied == current
    if since_s is None or since_s >= 100:
        assert applied == current + max(-step, min(step, target - current))
