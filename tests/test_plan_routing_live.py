"""Live: the router's dispatch follows the control plane's re-solved plan, and its admission
queue holds requests while the model is scaled to zero (issue 12).

Real routers on loopback with real HTTP, vLLM-shaped engines in their own processes, the
embedded state store the control plane and the router share; the control plane's clock is
driven by the test so that its windows are exact.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from router.controlplane import ControlPlane, PrintActuator, parse_config
from router.plan_routing import ROUTING_KEY
from router.state import FileStateStore, InstanceRecord
from tests.test_controlplane import MODEL, put_histogram
from tests.test_router_support import fake_engines, running_router

ONE_BUCKET = {"input_edges": [0, 1_000_000], "output_edges": [0, 1_000_000]}


def _router_doc(profile_filters: list[Any] | None = None, admission: dict[str, Any] | None = None) -> dict[str, Any]:
    policy: dict[str, Any] = {"selection": {"default": "default"}}
    if profile_filters is not None:
        policy["profiles"] = {"default": {"filters": profile_filters}}
    if admission is not None:
        policy["admission"] = admission
        policy["slo_classes"] = {"interactive": {"ttft_ms": 1000, "tpot_ms": 100,
                                                 "queue_timeout_ms": admission.pop("timeout_ms")}}
    return {"tenants": {"t": {"api_keys": ["k"], "slo_class": "interactive"}}, "policy": policy}


async def _post(client: httpx.AsyncClient, url: str) -> httpx.Response:
    return await client.post(url + "/v1/chat/completions", headers={"authorization": "Bearer k"},
                             json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def test_router_follows_the_control_planes_re_solved_plan(tmp_path: Path) -> None:
    """At 0.4 req/s the plan is one L4 (the `small` pool); at 4 req/s one A100 (`big`) is
    cheaper than eight L4s. Each re-solve publishes the plan's routing table; the router
    applies it to its length_bucket filter and the requests go where the plan says."""
    config = parse_config({
        "store": "file:///unused", **ONE_BUCKET, "actuator": "print", "resolve_interval_s": 0.001, "headroom": 0.0,
        "pools": [{"name": "small", "gpu": "L4", "usd_per_hour": 0.70, "capacity_rps": [[0.5]], "max_replicas": 12},
                  {"name": "big", "gpu": "A100-80GB", "usd_per_hour": 3.67, "capacity_rps": [[6.0]], "max_replicas": 3}],
        # no loop band: the re-solve prices pools at the planner's headroom, as this case assumes
        "autoscaler": {"interval_s": 10.0, "window_s": 20.0, "dwell_s": 3600.0, "idle_s": 3600.0, "headroom": 0.0,
                       "scale_down_headroom": 0.0},
        "metrics": {"port": None}}, "cp.yaml")
    now = [1_800_000_000.0]
    first_table = {**ONE_BUCKET, "cells": [], "rows": [{"input": 0, "pools": {"big": 1.0}}]}

    async def main() -> None:
        store = FileStateStore(tmp_path / "state.db")
        with fake_engines((), ()) as (small, big):
            records = [InstanceRecord("s0", small.url, MODEL, gpu="L4", pool="small"),
                       InstanceRecord("b0", big.url, MODEL, gpu="A100-80GB", pool="big")]
            doc = _router_doc(["model", "healthy", "not_draining", {"length_bucket": {"table": first_table}}])
            async with running_router(records, doc, store=store) as server, httpx.AsyncClient(timeout=20) as client:
                router, url = server.router, f"http://127.0.0.1:{server.port}"
                assert not await router.follow_routing()  # nothing published yet: the configured table
                plane = ControlPlane(config, store, PrintActuator({"small": 1, "big": 1}, emit=lambda _: None),
                                     clock=lambda: now[0])
                sent = {"small": 0, "big": 0}
                for rate, pool in ((0.4, "small"), (4.0, "big")):
                    now[0] += 100.0
                    await put_histogram(store, now[0], rate, range(1, 3), slot_s=10.0)
                    await plane.tick()
                    assert plane.plan is not None and plane.plan.instances() == {pool: 1}
                    assert await router.follow_routing()  # the new plan's table, applied
                    answers = await asyncio.gather(*[_post(client, url) for _ in range(4)])
                    assert [a.status_code for a in answers] == [200] * 4
                    sent[pool] += 4
                    assert (await small.stats())["requests_total"] == sent["small"]
                    assert (await big.stats())["requests_total"] == sent["big"]
                assert not await router.follow_routing()  # the same version is not applied twice
                assert any(action == "routing" for _, _, action, _ in plane.actions)
                # A malformed document is ignored: the last good table stays.
                await store.put_load(ROUTING_KEY, {"version": 1, "table": {"input_edges": [5]}}, 60.0)
                assert not await router.follow_routing()
                assert (await _post(client, url)).status_code == 200
                assert (await big.stats())["requests_total"] == sent["big"] + 1
        await store.close()

    asyncio.run(main())


HOLD = {"enabled": True, "hold_until_ready": True, "saturation": {"max_queued_per_instance": None}}


async def test_router_holds_requests_while_the_model_is_scaled_to_zero() -> None:
    """With `admission.hold_until_ready`, a request that finds every instance of its model
    down waits in the admission queue and is served once one comes up (the simulator's
    autoscaler runs the same decision, tests/test_plan_autoscale.py); past the class's queue
    timeout it gets 503; without the hold it gets 503 at once."""
    with fake_engines(()) as (engine,):
        for admission, expect in ((dict(HOLD, timeout_ms=5000), "served"), (dict(HOLD, timeout_ms=300), "timeout"),
                                  ({"enabled": True, "timeout_ms": 5000}, "refused")):
            async with running_router([engine.record("e0")], _router_doc(admission=admission)) as server, \
                    httpx.AsyncClient(timeout=20) as client:
                router, url = server.router, f"http://127.0.0.1:{server.port}"
                router.registry.mark_health("e0", False)  # the pool is at zero: its instance not up yet
                t0 = time.monotonic()
                answer = asyncio.ensure_future(_post(client, url))
                await asyncio.sleep(0.6)
                answered_while_down = answer.done()
                router.registry.mark_health("e0", True)  # the cold start is done
                response = await answer
                waited_s = time.monotonic() - t0
                if expect == "served":
                    assert response.status_code == 200 and waited_s >= 0.6 and not answered_while_down
                    assert (await engine.stats())["requests_total"] == 1
                elif expect == "timeout":
                    assert response.status_code == 503 and answered_while_down
                    assert "admission queue" in response.json()["error"]["message"]
                else:
                    assert response.status_code == 503 and answered_while_down
                    assert response.json()["error"]["code"] == "no_instance_available"


def test_a_request_held_at_zero_is_demand_that_scales_the_pool_up(tmp_path: Path) -> None:
    """The control plane plans from the routers' workload histogram, which counts answered
    requests; a request held because its pool is at zero is counted when it is held (once:
    not again when answered), so the next control round starts an instance for it."""
    config = parse_config({
        "store": "file:///unused", **ONE_BUCKET, "actuator": "print", "resolve_interval_s": 0.001,
        "pools": [{"name": "p", "gpu": "A100-80GB", "usd_per_hour": 3.67, "capacity_rps": [[2.0]]}],
        "autoscaler": {"interval_s": 10.0, "window_s": 60.0}, "metrics": {"port": None}}, "cp.yaml")

    async def main() -> None:
        store = FileStateStore(tmp_path / "state.db")
        with fake_engines(()) as (engine,):
            record = InstanceRecord("e0", engine.url, MODEL, gpu="A100-80GB", pool="p")
            doc = _router_doc(admission=dict(HOLD, timeout_ms=10000))
            async with running_router([record], doc, store=store) as server, httpx.AsyncClient(timeout=20) as client:
                router, url = server.router, f"http://127.0.0.1:{server.port}"
                router.registry.mark_health("e0", False)  # scaled to zero
                plane = ControlPlane(config, store, PrintActuator({"p": 0}, emit=lambda _: None))
                assert (await plane.tick())["p"] == 0  # nothing observed yet
                answer = asyncio.ensure_future(_post(client, url))
                await asyncio.sleep(0.3)
                assert not answer.done() and router.workload is not None and router.workload.recorded == 1
                await router.workload.flush()  # what its 5 s flush task does
                assert (await plane.tick())["p"] == 1  # the held request's demand starts an instance
                assert any(action == "scale_up" for _, _, action, _ in plane.actions)
                router.registry.mark_health("e0", True)  # ... and once it is up, the request is served
                assert (await answer).status_code == 200
                assert router.workload.recorded == 1  # counted once, when it was held
        await store.close()

    asyncio.run(main())
