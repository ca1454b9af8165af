"""Admission (flow control): the scheduler's queue and detector, and both drivers running it
(the simulator on a trace, the router over real HTTP to fake engines on loopback)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.admission import AdmissionQueue, SaturationDetector, Verdict
from scheduler.policy_document import AdmissionSpec, SaturationSpec
from scheduler.queueing import FcfsSort, SloPrioritySort
from scheduler.types import InstanceState, RequestInfo, SloClass
from sim.cluster import parse_cluster
from sim.simulator import simulate
from sim.workload import TraceRequest
from tests.test_router_support import fake_engines, running_router

INTERACTIVE = SloClass("interactive", 1000, 100, priority=0, queue_timeout_ms=500)
BATCH = SloClass("batch", 60000, 1000, priority=2, sheddable=True)


def _req(rid: str, slo_class: str = "interactive") -> RequestInfo:
    return RequestInfo(rid, "m", 10, slo_class=slo_class)


def test_queue_orders_sheds_evicts_expires_and_cancels() -> None:
    queue = AdmissionQueue(AdmissionSpec(enabled=True, max_queue_depth=3), SloPrioritySort())
    assert queue.offer(_req("a"), INTERACTIVE, saturated=False, now_s=0).verdict is Verdict.ADMIT
    assert queue.offer(_req("b1", "batch"), BATCH, True, 0.0).verdict is Verdict.QUEUE
    assert queue.offer(_req("i1"), INTERACTIVE, True, 0.1).verdict is Verdict.QUEUE
    assert queue.offer(_req("b2", "batch"), BATCH, True, 0.2).verdict is Verdict.QUEUE
    assert queue.peek_order(0.3) == ["i1", "b1", "b2"]  # class priority, then arrival
    # Full: a sheddable arrival is shed; a non-sheddable one evicts the last sheddable held.
    assert queue.offer(_req("b3", "batch"), BATCH, True, 0.3).verdict is Verdict.SHED
    offer = queue.offer(_req("i2"), INTERACTIVE, True, 0.3)
    assert offer.verdict is Verdict.QUEUE and offer.evicted is not None and offer.evicted.request.request_id == "b2"
    assert queue.offer(_req("i3"), INTERACTIVE, True, 0.3).verdict is Verdict.QUEUE  # evicts b1
    assert queue.offer(_req("i4"), INTERACTIVE, True, 0.3).verdict is Verdict.REJECT  # nothing sheddable left
    assert queue.depth_by_class() == {"interactive": 3}
    released = queue.release(0.4, lambda item: True)
    assert released is not None and released.request.request_id == "i1"
    assert queue.release(0.4, lambda item: False) is None
    assert queue.cancel("i2") and not queue.cancel("i2")
    assert queue.next_deadline_s() == pytest.approx(0.3 + 0.5)
    expired = queue.expire(0.81)
    assert [(item.request.request_id, verdict) for item, verdict in expired] == [("i3", Verdict.REJECT)]
    assert len(queue) == 0 and queue.shed_total == 3 and queue.rejected_total == 2


def test_release_skips_a_saturated_model_and_counts_passed_over() -> None:
    queue = AdmissionQueue(AdmissionSpec(enabled=True), FcfsSort())
    first = RequestInfo("x", "busy-model", 1)
    queue.offer(first, None, True, 0.0)
    queue.offer(RequestInfo("y", "free-model", 1), None, True, 0.0)
    item = queue.release(1.0, lambda held: held.request.model == "free-model")
    assert item is not None and item.request.request_id == "y"
    assert queue.release(1.0, lambda held: True) is not None
    assert queue.timeout_s(None) == 10.0  # the document's default


def test_saturation_detector_criteria() -> None:
    req = RequestInfo("r", "llama-3-8b", 2000, slo_class="interactive")
    busy = InstanceState("a", "llama-3-8b", gpu="A100-80GB", running=4, waiting=9)
    idle = InstanceState("b", "llama-3-8b", gpu="A100-80GB")
    depth = SaturationDetector(SaturationSpec(max_queued_per_instance=8))
    assert depth.instance_saturated(busy, req, INTERACTIVE) and not depth.instance_saturated(idle, req, INTERACTIVE)
    assert not depth.saturated([busy, idle], req, INTERACTIVE) and depth.saturated([busy], req, INTERACTIVE)
    assert not depth.saturated([], req, INTERACTIVE)  # nothing usable: dispatch answers for it
    drained = InstanceState("c", "llama-3-8b", draining=True)
    assert depth.saturated([busy, drained], req, INTERACTIVE)
    kv = SaturationDetector(SaturationSpec(max_queued_per_instance=None, max_kv_usage=0.9))
    full = InstanceState("d", "llama-3-8b", kv_blocks_used=95, kv_blocks_total=100)
    assert kv.instance_saturated(full, req, None)
    ttft = SaturationDetector(SaturationSpec(max_queued_per_instance=None, max_predicted_ttft_ratio=1.0))
    assert ttft.instance_saturated(InstanceState("e", "llama-3-8b", gpu="L4", running=200, waiting=60), req,
                                   INTERACTIVE)
    assert not ttft.instance_saturated(idle, req, INTERACTIVE)


# -- the simulator ---------------------------------------------------------------------------

def _overload_cluster(admission: bool) -> Any:
    policy = {
        "slo_classes": {"interactive": {"ttft_ms": 1000, "tpot_ms": 100, "priority": 0, "queue_timeout_ms": 4000},
                        "batch": {"ttft_ms": 30000, "tpot_ms": 1000, "priority": 2, "sheddable": True,
                                  "queue_timeout_ms": 2000},
                        "default": {"ttft_ms": 3000, "tpot_ms": 200, "priority": 1}},
        "queue": {"sort": "slo_priority", "engine_priority": "slo_priority"},
        "admission": {"enabled": admission, "max_queue_depth": 50,
                      "saturation": {"max_queued_per_instance": 2}},
    }
    pools = [{"name": "l4", "gpu": "L4", "model": "llama-3-8b", "count": 2,
              "engine": {"max_num_seqs": 8, "max_num_batched_tokens": 2048}}]
    return parse_cluster({"pools": pools, "policy": policy}, "overload.yaml")


def _trace(n: int) -> list[TraceRequest]:
    return [TraceRequest(request_id=f"r{k}", arrival_s=k * 0.02, input_tokens=600, output_tokens=120,
                         slo_class="batch" if k % 2 else "interactive") for k in range(n)]


def test_simulated_overload_queues_and_sheds() -> None:
    on = simulate(_overload_cluster(True), _trace(400))
    off = simulate(_overload_cluster(False), _trace(400))
    assert len(on.records) == len(off.records) == 400  # every request answered exactly once
    assert not any(r.rejected for r in off.records)
    shed = [r for r in on.records if r.rejected and r.reject_reason.startswith("shed (429)")]
    assert shed and all(r.slo_class == "batch" for r in shed)
    served = [r for r in on.records if not r.rejected]
    assert any(r.dispatch_s > r.arrival_s for r in served)  # some waited in the queue
    assert all(r.dispatch_s - r.arrival_s <= 4.0 + 1e-9 for r in served)  # none beyond its class timeout

    def p90_ttft(records: list[Any]) -> float:
        ttfts = sorted(r.first_token_s - r.arrival_s for r in records
                       if not r.rejected and r.slo_class == "interactive")
        return ttfts[int(0.9 * (len(ttfts) - 1))]

    assert p90_ttft(on.records) < p90_ttft(off.records)


# -- the router (real HTTP, fake engines on loopback) -------------------------------------------

def _router_doc(**admission: Any) -> dict[str, Any]:
    return {
        "tenants": {"i": {"api_keys": ["ki"], "slo_class": "interactive"},
                    "b": {"api_keys": ["kb"], "slo_class": "batch"}},
        "policy": {
            "slo_classes": {"interactive": {"ttft_ms": 1000, "tpot_ms": 100, "priority": 0,
                                            "queue_timeout_ms": admission.pop("timeout_ms", 5000)},
                            "batch": {"ttft_ms": 60000, "tpot_ms": 1000, "priority": 2, "sheddable": True}},
            "selection": {"default": "default"},
            "admission": {"enabled": True, "retry_after_s": 3, "max_queue_depth": admission.pop("depth", 16),
                          "saturation": {"max_queued_per_instance": None, "max_outstanding_per_instance": 1}},
        },
    }


def _body(tokens: int = 4) -> dict[str, Any]:
    return {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens,
            "stream": True}


async def _post(client: httpx.AsyncClient, url: str, key: str, tokens: int = 4) -> httpx.Response:
    return await client.post(url + "/v1/chat/completions", json=_body(tokens),
                             headers={"authorization": f"Bearer {key}"})


async def test_router_queues_until_capacity_frees() -> None:
    with fake_engines(("--token-delay-s", "0.05")) as (engine,):
        async with running_router([engine.record("e0")], _router_doc()) as server:
            url = f"http://127.0.0.1:{server.port}"
            async with httpx.AsyncClient(timeout=20) as client:
                t0 = time.monotonic()
                answers = await asyncio.gather(*[_post(client, url, "ki") for _ in range(3)])
                took_s = time.monotonic() - t0
                assert [a.status_code for a in answers] == [200, 200, 200]
                assert took_s >= 3 * 3 * 0.05 * 0.8  # served one after another, not all at once
                metrics = (await client.get(url + "/metrics")).text
                assert 'tokenyard_router_queue_wait_seconds_count{outcome="released",slo_class="interactive"} 2.0' \
                    in metrics
            assert (await engine.stats())["requests_total"] == 3


async def test_router_sheds_429_and_refuses_503_when_full() -> None:
    with fake_engines(("--token-delay-s", "0.1")) as (engine,):
        async with running_router([engine.record("e0")], _router_doc(depth=0)) as server:
            url = f"http://127.0.0.1:{server.port}"
            async with httpx.AsyncClient(timeout=20) as client:
                busy = asyncio.ensure_future(_post(client, url, "ki", tokens=8))
                await asyncio.sleep(0.3)
                shed = await _post(client, url, "kb")
                assert shed.status_code == 429 and shed.headers["retry-after"] == "3"
                assert shed.json()["error"]["code"] == "overloaded"
                refused = await _post(client, url, "ki")
                assert refused.status_code == 503
                assert (await busy).status_code == 200


async def test_router_queue_timeout_and_cancelled_client_leaves_at_once() -> None:
    with fake_engines(("--token-delay-s", "0.2")) as (engine,):
        async with running_router([engine.record("e0")], _router_doc(timeout_ms=300)) as server:
            router = server.router
            url = f"http://127.0.0.1:{server.port}"
            async with httpx.AsyncClient(timeout=20) as client:
                busy = asyncio.ensure_future(_post(client, url, "ki", tokens=10))
                await asyncio.sleep(0.3)
                t0 = time.monotonic()
                timed_out = await _post(client, url, "ki")
                assert timed_out.status_code == 503 and 0.25 <= time.monotonic() - t0 < 1.5
                assert "queue timeout" in timed_out.json()["error"]["message"]
                async with httpx.AsyncClient(timeout=0.15) as impatient:
                    with pytest.raises(httpx.TimeoutException):
                        await _post(impatient, url, "kb")
                await asyncio.sleep(0.1)
                assert router.admission is not None and len(router.admission.queue) == 0
                assert (await busy).status_code == 200
            assert (await engine.stats())["requests_total"] == 1  # neither queued request was forwarded


@settings(max_examples=150, deadline=None)
@given(loads=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 20), st.integers(0, 60), st.integers(0, 100),
                                st.sampled_from([0, 100]), st.booleans(), st.booleans()), max_size=8),
       queued=st.sampled_from([None, 0, 1, 4, 8]), outstanding=st.sampled_from([None, 1, 8, 32]),
       kv=st.sampled_from([None, 0.5, 0.95, 1.0]), slo_class=st.sampled_from(["interactive", "batch"]))
def test_inlined_saturation_check_matches_its_definition(loads: list[tuple[int, int, int, int, int, bool, bool]],
                                                         queued: int | None, outstanding: int | None,
                                                         kv: float | None, slo_class: str) -> None:
    group = [InstanceState(f"i{k}", "m", running=r, waiting=w, router_inflight=f, kv_blocks_used=min(u, t),
                           kv_blocks_total=t, healthy=h, draining=d)
             for k, (r, w, f, u, t, h, d) in enumerate(loads)]
    spec = SaturationSpec(max_queued_per_instance=queued, max_outstanding_per_instance=outstanding, max_kv_usage=kv)
    detector = SaturationDetector(spec, by_slo_class={"batch": SaturationSpec(max_queued_per_instance=2)})
    request = RequestInfo("r", "m", 100, slo_class=slo_class)
    assert detector.saturated(group, request, None) == detector._saturated_by_method(group, request, None)
