"""The ext_proc picker's message sequences, driven by a plain gRPC client (no Envoy).

Each test opens `ExternalProcessor.Process` streams on a real loopback gRPC server and plays
the data plane: FULL_DUPLEX_STREAMED bodies in chunks, bodyless requests, trailers, the
gateway's subset hint, the served-endpoint feedback, streams that end early, gRPC health.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.app import Router
from router.config import parse_router_config
from router.extproc import (
    BODY_CHUNK_BYTES,
    DESTINATION_KEY,
    EXTPROC_SERVICE,
    LB_NAMESPACE,
    SERVED_KEY,
    SUBSET_KEY,
    SUBSET_NAMESPACE,
    ExtProcSettings,
    start_extproc_server,
)
from scheduler.shedding import ShedPolicy

MODEL = "llama-3-8b"
STATIC = [{"url": f"http://10.0.0.{i}:8000", "model": MODEL, "id": f"e{i}"} for i in (1, 2, 3)]


@contextlib.asynccontextmanager
async def picker(settings: ExtProcSettings | None = None, **doc: Any) -> AsyncIterator[tuple[Router, Any]]:
    router = Router(parse_router_config({"discovery": {"static": STATIC}, **doc}, "extproc.yaml"))
    await router.start(background=False)
    server = await start_extproc_server(router, "127.0.0.1", 0, settings or ExtProcSettings(max_endpoints=2))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield router, channel
    finally:
        await channel.close()
        await server.stop(0.2)
        await router.stop()


def headers(path: str = "/v1/chat/completions", method: str = "POST", eos: bool = False,
            **extra: str) -> pb.ProcessingRequest:
    items = [(":path", path), (":method", method), ("content-type", "application/json"), *extra.items()]
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode())
                                            for k, v in items]), end_of_stream=eos))


def body(data: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def chat(content: str = "hello", model: str = MODEL) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4})


class Stream:
    """One Process stream: send messages, read responses, with a timeout on each read."""

    def __init__(self, channel: Any) -> None:
        self.queue: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()
        self.call = pb_grpc.ExternalProcessorStub(channel).Process(self._requests())
        self._pending: asyncio.Future[Any] | None = None

    async def _requests(self) -> AsyncIterator[pb.ProcessingRequest]:
        while (item := await self.queue.get()) is not None:
            yield item

    def send(self, *requests: pb.ProcessingRequest) -> None:
        for request in requests:
            self.queue.put_nowait(request)

    async def _next(self, timeout_s: float) -> pb.ProcessingResponse:
        # A read that timed out stays pending (gRPC allows one read at a time) and is reused.
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.call.read())
        done, _ = await asyncio.wait({self._pending}, timeout=timeout_s)
        if not done:
            raise TimeoutError
        task, self._pending = self._pending, None
        return task.result()

    async def read(self, n: int) -> list[pb.ProcessingResponse]:
        return [await self._next(5) for _ in range(n)]

    async def nothing_pending(self) -> bool:
        try:
            await self._next(0.2)
        except TimeoutError:
            return True
        return False

    async def close(self) -> None:
        self.queue.put_nowait(None)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError, TimeoutError):
            await self._next(5)


def destination(response: pb.ProcessingResponse) -> tuple[str, str, dict[str, str]]:
    set_headers = {h.header.key: h.header.raw_value.decode() for h in
                   response.request_headers.response.header_mutation.set_headers}
    meta = response.dynamic_metadata.fields[LB_NAMESPACE].struct_value.fields[DESTINATION_KEY].string_value
    return set_headers[DESTINATION_KEY], meta, set_headers


async def test_chunked_body_is_answered_after_its_last_chunk_then_streamed_back_unchanged() -> None:
    async with picker() as (router, channel):
        stream = Stream(channel)
        raw = chat("x" * (BODY_CHUNK_BYTES + 5000))
        stream.send(headers(authorization="Bearer anything"), body(raw[:1000], False), body(raw[1000:30000], False))
        assert await stream.nothing_pending()  # no answer before the body is complete
        stream.send(body(raw[30000:], True))
        first, *chunks = await stream.read(3)
        header_value, meta_value, set_headers = destination(first)
        assert header_value == meta_value  # the header and the metadata never disagree
        endpoints = header_value.split(",")
        assert len(endpoints) == 2 and set(endpoints) <= {"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"}
        assert set_headers["content-length"] == str(len(raw))
        streamed = [c.request_body.response.body_mutation.streamed_response for c in chunks]
        assert b"".join(s.body for s in streamed) == raw and [s.end_of_stream for s in streamed] == [False, True]
        primary = next(r.instance_id for r in router.registry.records() if r.url.endswith(endpoints[0]))
        assert router.registry.get(primary)[1].router_inflight == 1  # placed on the primary
        # The gateway reports that the fallback served: the count follows it.
        fallback = next(r.instance_id for r in router.registry.records() if r.url.endswith(endpoints[1]))
        served = struct_pb2.Struct()
        served.update({LB_NAMESPACE: {SERVED_KEY: endpoints[1]}})
        stream.send(pb.ProcessingRequest(
            response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
                base_pb2.HeaderValue(key=":status", raw_value=b"200")])),
            metadata_context=base_pb2.Metadata(filter_metadata={LB_NAMESPACE: served[LB_NAMESPACE]})))
        (headers_reply,) = await stream.read(1)
        assert headers_reply.WhichOneof("response") == "response_headers"
        assert router.registry.get(primary)[1].router_inflight == 0
        assert router.registry.get(fallback)[1].router_inflight == 1
        stream.send(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: 1\n\n", end_of_stream=False)),
                    pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: [DONE]\n\n", end_of_stream=True)))
        replies = await stream.read(2)
        assert [r.response_body.response.body_mutation.streamed_response.body for r in replies] == [
            b"data: 1\n\n", b"data: [DONE]\n\n"]
        assert router.registry.get(fallback)[1].router_inflight == 0
        await stream.close()


KEY = "Bearer sk-t"


async def test_errors_are_immediate_responses_in_openai_shape() -> None:
    cases = [
        ([headers(authorization=KEY), body(b"{not json", True)], 400, "invalid JSON"),
        ([headers(authorization=KEY), body(orjson.dumps({"messages": []}), True)], 400, "'model' is required"),
        ([headers(authorization=KEY), body(chat(model="nope"), True)], 404, "Served models: llama-3-8b"),
        ([headers(authorization=KEY), body(b"x" * 3000, False)], 413, "exceeds the limit of 2048 bytes"),
        ([headers(), body(chat(), True)], 401, "missing API key"),
        ([headers(authorization="Bearer sk-wrong"), body(chat(), True)], 401, "incorrect API key"),
    ]
    async with picker(tenants={"t": {"api_keys": ["sk-t"]}}, limits={"max_request_bytes": 2048}) as (router, channel):
        for messages, status, text in cases:
            stream = Stream(channel)
            stream.send(*messages)
            (reply,) = await stream.read(1)
            assert reply.immediate_response.status.code == status, (status, reply)
            error = orjson.loads(reply.immediate_response.body)["error"]
            assert text in error["message"], error
            assert (await stream.call.code()) == grpc.StatusCode.OK  # the picker ends the stream itself
        assert all(s.router_inflight == 0 for s in router.registry.instances())


async def test_503_when_nothing_is_ready_and_429_to_shed() -> None:
    settings = ExtProcSettings(max_endpoints=2, shed=ShedPolicy(max_outstanding_per_instance=1))
    doc = {"tenants": {"batch": {"api_keys": ["sk-b"], "slo_class": "batch"},
                       "chat": {"api_keys": ["sk-c"], "slo_class": "interactive"}},
           "slo_classes": {"interactive": {"ttft_ms": 500, "tpot_ms": 50, "priority": 0},
                           "batch": {"ttft_ms": 9000, "tpot_ms": 500, "priority": 2}}}
    async with picker(settings, **doc) as (router, channel):
        for iid in ("e1", "e2", "e3"):
            router.registry.update_load(iid, running=1)
        stream = Stream(channel)
        stream.send(headers(authorization="Bearer sk-b"), body(chat(), True))
        (reply,) = await stream.read(1)
        assert reply.immediate_response.status.code == 429
        stream = Stream(channel)  # the interactive class is not sheddable
        stream.send(headers(authorization="Bearer sk-c"), body(chat(), True))
        first, _ = await stream.read(2)
        assert destination(first)[0]
        await stream.close()
        for iid in ("e1", "e2", "e3"):
            router.registry.mark_health(iid, False)
        stream = Stream(channel)
        stream.send(headers(authorization="Bearer sk-b"), body(chat(), True))  # unready beats shedding
        (reply,) = await stream.read(1)
        assert reply.immediate_response.status.code == 503
        assert orjson.loads(reply.immediate_response.body)["error"]["code"] == "no_instance_available"


async def test_subset_hint_restricts_the_pick() -> None:
    async with picker(ExtProcSettings(max_endpoints=3)) as (_, channel):
        for subset, expected in ((["10.0.0.3:8000"], "10.0.0.3:8000"),
                                 (["10.0.0.2:8000", "10.0.0.9:8000"], "10.0.0.2:8000")):
            hint = struct_pb2.Struct()
            hint.update({SUBSET_KEY: subset})
            stream = Stream(channel)
            request = body(chat(), True)
            request.metadata_context.filter_metadata[SUBSET_NAMESPACE].CopyFrom(hint)
            stream.send(headers(), request)
            first, _ = await stream.read(2)
            assert destination(first)[0] == expected
            await stream.close()
        hint = struct_pb2.Struct()
        hint.update({SUBSET_KEY: ["10.9.9.9:8000"]})
        stream = Stream(channel)
        first_message = headers()  # the hint may come with the headers only
        first_message.metadata_context.filter_metadata[SUBSET_NAMESPACE].CopyFrom(hint)
        stream.send(first_message, body(chat(), True))
        (reply,) = await stream.read(1)
        assert reply.immediate_response.status.code == 503


async def test_bodyless_request_trailers_and_an_early_end() -> None:
    async with picker() as (router, channel):
        stream = Stream(channel)  # GET /v1/models: headers only, routed to a ready instance
        stream.send(headers("/v1/models", "GET", eos=True))
        (reply,) = await stream.read(1)
        assert destination(reply)[0].split(",")[0].startswith("10.0.0.")
        await stream.close()

        stream = Stream(channel)  # a body followed by trailers: decided on the trailers
        raw = chat()
        stream.send(headers(), body(raw, False))
        assert await stream.nothing_pending()
        stream.send(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
        first, rest, trailers = await stream.read(3)
        assert destination(first)[0]
        assert rest.request_body.response.body_mutation.streamed_response.body == raw
        assert not rest.request_body.response.body_mutation.streamed_response.end_of_stream
        assert trailers.WhichOneof("response") == "request_trailers"
        assert sum(s.router_inflight for s in router.registry.instances()) == 1
        # The client goes away before any response: the stream ends and the count is released.
        stream.call.cancel()
        for _ in range(50):
            if sum(s.router_inflight for s in router.registry.instances()) == 0:
                break
            await asyncio.sleep(0.02)
        assert sum(s.router_inflight for s in router.registry.instances()) == 0


async def test_grpc_health_services() -> None:
    async with picker() as (_, channel):
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "liveness", "readiness", EXTPROC_SERVICE):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_tokenyard_router_extproc_port_serves_the_picker(tmp_path: Any) -> None:
    import os
    import signal
    import subprocess
    import sys

    config = tmp_path / "router.yaml"
    config.write_text(orjson.dumps({"listen": {"host": "127.0.0.1", "port": 0},
                                    "discovery": {"static": STATIC}}).decode())
    refused = subprocess.run([sys.executable, "-m", "cli.main", "router", "--config", str(config),
                              "--port", "18000", "--workers", "2", "--extproc-port", "0"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--extproc-port runs in one process" in refused.stderr
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "router", "--config", str(config),
                             "--store", f"file://{tmp_path / 'state.json'}", "--extproc-host", "127.0.0.1",
                             "--extproc-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        picker_line = next(line for line in lines if "ext_proc endpoint picker on" in line)
        address = picker_line.rsplit(" ", 1)[-1].strip()
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            replies = pb_grpc.ExternalProcessorStub(channel).Process(iter([headers(), body(chat(), True)]),
                                                                    timeout=10)
            first = next(replies)
            assert destination(first)[0].split(",")[0] in {"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"}
            replies.cancel()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_request_body_that_never_completes_times_out() -> None:
    async with picker(ExtProcSettings(request_timeout_s=0.3)) as (router, channel):
        stream = Stream(channel)
        stream.send(headers(), body(b'{"model": ', False))  # and then nothing
        (reply,) = await stream.read(1)
        assert reply.immediate_response.status.code == 408
        assert "not complete within 0.3 s" in orjson.loads(reply.immediate_response.body)["error"]["message"]
        assert (await stream.call.code()) == grpc.StatusCode.OK
        assert all(s.router_inflight == 0 for s in router.registry.instances())


def test_should_shed_only_sheddable_requests_when_every_usable_instance_is_full() -> None:
    from scheduler.shedding import should_shed
    from scheduler.types import InstanceState

    policy = ShedPolicy(max_outstanding_per_instance=4, shed_priority_at_least=2)
    full = InstanceState("a", MODEL, running=3, waiting=1)
    free = InstanceState("b", MODEL, router_inflight=3)
    sick = InstanceState("c", MODEL, healthy=False)
    draining = InstanceState("d", MODEL, draining=True)
    assert should_shed([full, sick, draining], 2, policy)  # the unusable ones do not count
    assert not should_shed([full, free], 2, policy)  # one instance still has room
    assert not should_shed([full], 1, policy)  # not sheddable
    assert not should_shed([sick, draining], 5, policy)  # nothing ready is a 503, not a 429
    assert not should_shed([full], 9, ShedPolicy(max_outstanding_per_instance=0))  # shedding off
    with pytest.raises(ValueError, match="max_outstanding_per_instance"):
        ShedPolicy(max_outstanding_per_instance=-1)


async def test_picker_with_tokens_refuses_calls_without_one_and_health_stays_open() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from router.auth import Principal, TokenTable, token_digest

    gateway, viewer = "gateway-token-0123456789", "viewer-token-0123456789"
    tokens = TokenTable([(token_digest(gateway), Principal("envoy", frozenset({"picker"}))),
                         (token_digest(viewer), Principal("dash", frozenset({"viewer"})))])
    async with picker(ExtProcSettings(max_endpoints=2, tokens=tokens)) as (_, channel):
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes carry no token
        for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED),
                               ((("authorization", f"Bearer {viewer}"),), grpc.StatusCode.PERMISSION_DENIED)):
            call = pb_grpc.ExternalProcessorStub(channel).Process(iter([headers(eos=True)]), metadata=metadata)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
            assert refused.value.code() == code
        call = pb_grpc.ExternalProcessorStub(channel).Process(
            iter([headers(authorization="Bearer anything"), body(chat(), True)]),
            metadata=(("authorization", f"Bearer {gateway}"),))
        first = await call.read()
        assert destination(first)[0]  # the gateway's token is accepted: a destination comes back


async def test_picker_refuses_a_network_address_without_authentication() -> None:
    router = Router(parse_router_config({"discovery": {"static": STATIC}}, "extproc.yaml"))
    await router.start(background=False)
    try:
        with pytest.raises(OSError, match="without authentication"):
            await start_extproc_server(router, "0.0.0.0", 0, ExtProcSettings())
    finally:
        await router.stop()


SMALL_TIER, LARGE_TIER = "qwen2.5-1.5b", "llama-3-8b"
TIER_STATIC = [{"url": "http://10.0.1.1:8000", "model": SMALL_TIER, "id": "s1"},
               {"url": "http://10.0.1.2:8000", "model": LARGE_TIER, "id": "l1"}]
TIER_PROMPTS = ["What is 2+2?", "Write a haiku about autumn.",
                "Prove that there are infinitely many primes, step by step, and explain each step.",
                "Which of the following is NOT a noble gas?\nA. Neon\nB. Argon\nC. Nitrogen\nD. Xenon",
                "Janet has 3 apples. Each day she buys twice as many as the day before. How many after 5 days?"]


def splitting_target(prompts: list[str]) -> float:
    """A quality target whose threshold (packaged tier model) falls between these prompts'
    scores, so some go small and some large whatever the model ranks first."""
    from scheduler.predictors.tier import load_predictor

    predictor = load_predictor()
    scores = sorted(predictor.score(p) for p in prompts)
    rows = sorted(predictor.thresholds, key=lambda r: r.threshold)
    return next(r.pgr for r in rows if scores[0] < r.threshold <= scores[-1])


async def test_the_tier_alias_is_resolved_by_the_front_doors_decision() -> None:
    """`model: auto` through ext_proc: the tier is `TierResolver.resolve`'s (the HTTP front
    door's call), the destination is an endpoint of that tier, and the body streamed back
    names the tier's model (with its new length); other models pass byte for byte."""
    doc = {"tenants": {"t": {"api_keys": ["sk-t"]}, "thrifty": {"api_keys": ["sk-thrifty"]}},
           "tiers": {"alias": "auto", "small_model": SMALL_TIER, "large_model": LARGE_TIER, "policy": "quality_only",
                     "default": {"quality_target": splitting_target(TIER_PROMPTS)},
                     "tenants": {"thrifty": {"cost_budget": 0.0}}}}
    async with picker(ExtProcSettings(max_endpoints=1), discovery={"static": TIER_STATIC}, **doc) as (router, channel):
        tiers = router.tiers
        assert tiers is not None
        threshold = tiers.router.by_tenant.get("t", tiers.router.default).normal
        address = {SMALL_TIER: "10.0.1.1:8000", LARGE_TIER: "10.0.1.2:8000"}
        chosen = {}
        for key, prompt in [("sk-t", p) for p in TIER_PROMPTS] + [("sk-thrifty", TIER_PROMPTS[2])]:
            stream = Stream(channel)
            stream.send(headers(authorization=f"Bearer {key}"), body(chat(prompt, model="auto"), True))
            first, streamed = await stream.read(2)
            header_value, _, set_headers = destination(first)
            forwarded = orjson.loads(streamed.request_body.response.body_mutation.streamed_response.body)
            expected = (SMALL_TIER if key == "sk-thrifty" or tiers.predictor.score(prompt) >= threshold
                        else LARGE_TIER)
            assert forwarded["model"] == expected, (key, prompt, tiers.predictor.score(prompt), threshold)
            assert header_value == address[expected]
            assert set_headers["content-length"] == str(len(orjson.dumps(forwarded)))
            chosen[(key, prompt)] = expected
            await stream.close()
        assert {m for (k, _), m in chosen.items() if k == "sk-t"} == {SMALL_TIER, LARGE_TIER}  # both tiers drawn
        rendered = router.metrics.render().decode()
        small_count = sum(m == SMALL_TIER for m in chosen.values())
        assert f'tokenyard_router_tier_choices_total{{model="{SMALL_TIER}",tier="small"}} {small_count}.0' in rendered
        stream = Stream(channel)  # a concrete model name: untouched
        raw = chat("hello", model=LARGE_TIER)
        stream.send(headers(authorization="Bearer sk-t"), body(raw, True))
        first, streamed = await stream.read(2)
        assert streamed.request_body.response.body_mutation.streamed_response.body == raw
        assert destination(first)[0] == address[LARGE_TIER]
        await stream.close()
